"""Weight projection from a video teacher onto an image student (model/image_kd.py, scripts/project_weights.py):
the folded patch embedding, layer selection, the truncate width rule, how much of the teacher's one-frame
prediction the projected student keeps, the script's diffusers folder, and one-line errors for students the
projection cannot map. The GPU test measures it at Wan2.1-1.3B size."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.image_kd import check_projectable, default_blocks, fold_patch_embedding, prediction_error, project_state_dict
from model.wan.transformer import WanDiT, WanImageDiT
from model.wan.weights import load_strict, read_config, read_state_dict
from scripts.project_weights import main as project_weights
from tests.wan_folder import TRANSFORMER, Z_DIM, tiny_wan_folder  # noqa: F401  (session fixture)
from tests.wan_tiny import randomize

# A teacher with room to narrow and shorten: 4 blocks, 4 heads of 8 channels (width 32), 64 feed-forward units.
TEACHER = dict(TRANSFORMER, num_layers=4, num_attention_heads=4, ffn_dim=64)
LATENT = (Z_DIM, 8, 8)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def teacher_net() -> WanDiT:
    return randomize(WanDiT(**TEACHER), 5).eval().requires_grad_(False)


def projected(teacher: WanDiT, blocks=None, **size) -> WanImageDiT:
    config = dict(TEACHER, **size)
    student = WanImageDiT(**config).eval().requires_grad_(False)
    load_strict(student, project_state_dict(teacher.state_dict(), dict(teacher.config), config, blocks))
    return student


def test_the_folded_patch_kernel_equals_the_3d_conv_on_one_frame():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 1, 8, 6, generator=gen, dtype=torch.float64)  # [B, C, F=1, H, W]
    weight, bias = torch.randn(32, 4, 1, 2, 2, generator=gen, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    three = F.conv3d(x, weight, bias, stride=(1, 2, 2))[:, :, 0]
    two = F.conv2d(x[:, :, 0], fold_patch_embedding(weight), bias, stride=2)
    assert three.shape == two.shape == (2, 32, 4, 3)
    assert (three - two).abs().max().item() < 1e-12
    # a kernel with 2 temporal taps (not Wan's): the folded conv is the 3-D conv of the still clip [frame, frame]
    weight = torch.randn(32, 4, 2, 2, 2, generator=gen, dtype=torch.float64)
    still = F.conv3d(x.expand(-1, -1, 2, -1, -1), weight, bias, stride=(2, 2, 2))[:, :, 0]
    assert (still - F.conv2d(x[:, :, 0], fold_patch_embedding(weight), bias, stride=2)).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match=r"3-D patch kernel"):
        fold_patch_embedding(weight[:, :, 0])
    # in the networks: the image student's tokens are the video DiT's on one frame
    teacher, student = teacher_net(), projected(teacher_net())
    frame = torch.randn(2, 1, *LATENT, generator=gen)
    assert torch.equal(teacher._patchify(frame), student._patchify(frame))


def test_layer_selection_copies_exactly_the_chosen_blocks():
    assert default_blocks(4, 2) == [0, 3] and default_blocks(4, 4) == [0, 1, 2, 3] and default_blocks(4, 1) == [0]
    assert default_blocks(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]  # Wan-1.3B, half depth
    teacher = teacher_net()
    state = teacher.state_dict()
    for blocks, expect in ((None, [0, 3]), ([2, 1], [2, 1])):
        student = projected(teacher, blocks, num_layers=2).state_dict()
        for i, j in enumerate(expect):
            mine = {k[len(f"blocks.{i}."):]: v for k, v in student.items() if k.startswith(f"blocks.{i}.")}
            assert mine and all(torch.equal(v, state[f"blocks.{j}.{k}"]) for k, v in mine.items())
        outside = {k: v for k, v in student.items() if not k.startswith("blocks.")}
        assert all(torch.equal(v, state[k]) for k, v in outside.items() if k != "patch_embedding.weight")
        assert torch.equal(student["patch_embedding.weight"], state["patch_embedding.weight"][:, :, 0])


def test_a_narrower_student_keeps_the_first_heads_units_and_channels():
    teacher = teacher_net()
    t = teacher.state_dict()
    s = projected(teacher, num_attention_heads=2, ffn_dim=40, num_layers=3).state_dict()
    assert s["blocks.0.attn1.to_q.weight"].shape == (16, 16)
    assert torch.equal(s["blocks.0.attn1.to_q.weight"], t["blocks.0.attn1.to_q.weight"][:16, :16])
    assert torch.equal(s["blocks.2.attn2.to_out.0.weight"], t["blocks.3.attn2.to_out.0.weight"][:16, :16])
    assert torch.equal(s["blocks.1.attn1.norm_k.weight"], t["blocks.2.attn1.norm_k.weight"][:16])  # blocks 0, 2, 3
    assert torch.equal(s["blocks.1.ffn.net.0.proj.weight"], t["blocks.2.ffn.net.0.proj.weight"][:40, :16])
    assert torch.equal(s["blocks.1.ffn.net.2.weight"], t["blocks.2.ffn.net.2.weight"][:16, :40])
    assert torch.equal(s["blocks.0.scale_shift_table"], t["blocks.0.scale_shift_table"][..., :16])
    rows = torch.cat([torch.arange(16) + 32 * k for k in range(6)])  # each of the six modulation chunks narrowed
    assert torch.equal(s["condition_embedder.time_proj.weight"], t["condition_embedder.time_proj.weight"][rows][:, :16])
    assert torch.equal(s["proj_out.weight"], t["proj_out.weight"][:, :16])
    assert torch.equal(s["patch_embedding.weight"], t["patch_embedding.weight"][:16, :, 0])


def test_the_projected_student_keeps_most_of_the_teachers_one_frame_prediction():
    """||v_student - v_teacher|| / ||v_teacher|| on random one-frame inputs, before training, at this tiny random size:
    0 at the teacher's size, 0.55 at half depth, 0.67 at half width (heads and units), 0.83 at both, 1.0 for a random
    student of the teacher's size."""
    teacher = teacher_net()
    errors = {}
    for name, size in {"same": {}, "half_depth": {"num_layers": 2}, "half_width": {"num_attention_heads": 2, "ffn_dim": 32},
                       "half_both": {"num_layers": 2, "num_attention_heads": 2, "ffn_dim": 32}}.items():
        errors[name] = prediction_error(teacher, projected(teacher, **size), LATENT, text_len=6)["relative_error"]
    torch.manual_seed(0)
    errors["random"] = prediction_error(teacher, WanImageDiT(**TEACHER).eval(), LATENT, text_len=6)["relative_error"]
    assert errors["same"] < 1e-6
    expected = {"half_depth": 0.549, "half_width": 0.670, "half_both": 0.829, "random": 1.004}
    assert {k: errors[k] for k in expected} == pytest.approx(expected, abs=0.005), errors
    assert errors["same"] < errors["half_depth"] < errors["half_width"] < errors["half_both"] < errors["random"]


def test_bad_students_are_one_line_errors():
    teacher = dict(TEACHER)
    cases = [
        (dict(num_attention_heads=8), None, r"num_attention_heads=8 is wider than the teacher's 4"),
        (dict(ffn_dim=128), None, r"ffn_dim=128 is wider than the teacher's 64"),
        (dict(num_layers=6), None, r"num_layers=6 is deeper than the teacher's 4"),
        (dict(attention_head_dim=4), None, r"attention_head_dim=4 differs from the teacher's 8"),
        (dict(text_dim=8), None, r"text_dim=8 differs from the teacher's 16"),
        (dict(num_layers=2), [0, 4], r"teacher_blocks=\[0, 4\]: block 4 is out of range; the teacher has blocks 0..3"),
        (dict(num_layers=2), [0, 1, 2], r"teacher_blocks=\[0, 1, 2\]: give 2 distinct teacher blocks, one per student"),
        (dict(num_layers=2), [1, 1], r"teacher_blocks=\[1, 1\]: give 2 distinct teacher blocks"),
        (dict(num_layers=6), [0, 0, 1, 1, 2, 3], r"num_layers=6 is deeper than the teacher's 4"),  # no repeats to deepen
    ]
    for size, blocks, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            check_projectable(teacher, dict(teacher, **size), blocks)
        assert "\n" not in str(error.value)


def script_overrides(folder: Path, *more: str) -> list[str]:
    backbone = dict(TRANSFORMER, num_layers=1, patch_size=list(TRANSFORMER["patch_size"]))
    node = "{" + ",".join(f"{k}:{v}" for k, v in backbone.items()).replace("'", "").replace(" ", "") + "}"
    return ["experiment=image_kd", f"model.path={folder}", f"model.backbone={node}", "model.latent_shape=[4,8,8]",
            "model.text_encoder.text_len=16", "model.dtype=float32", *more]


def test_the_script_writes_a_diffusers_folder_the_method_would_start_from(tiny_wan_folder, tmp_path, capsys):
    from engine.config import compose_checked
    from model.image_kd import build_image_student
    from model.wan.weights import load_backbone

    out = tmp_path / "student"
    report = project_weights(["--out", str(out), *script_overrides(tiny_wan_folder)])
    printed = capsys.readouterr().out
    assert "teacher blocks [0]" in printed and "relative error to the teacher: projected" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "projection.json"]
    assert json.loads((out / "config.json").read_text())["_class_name"] == "WanImageDiT"
    saved = json.loads((out / "projection.json").read_text())
    assert saved["teacher_blocks"] == [0] and saved["student_layers"] == 1 and saved["teacher_layers"] == 2
    assert 0.2 < saved["projected"]["relative_error"] < 0.7 * saved["random_init"]["relative_error"]
    assert report["projected"]["relative_error"] == saved["projected"]["relative_error"]
    loaded = WanImageDiT.from_pretrained(out)
    cfg = compose_checked(script_overrides(tiny_wan_folder))
    method_start = build_image_student(cfg, {"teacher": load_backbone(tiny_wan_folder)})  # method.project_init=true
    assert all(torch.equal(v, method_start.state_dict()[k]) for k, v in loaded.state_dict().items())
    # read tensor by tensor from the files (what a sharded-loading run, whose teacher is built empty, projects)
    teacher_config = {k: v for k, v in read_config(tiny_wan_folder).items() if not k.startswith("_")}
    lazy = project_state_dict(read_state_dict(tiny_wan_folder, lazy=True), teacher_config, dict(loaded.config))
    assert all(torch.equal(v, lazy[k]) for k, v in loaded.state_dict().items())
    # a student the projection cannot map: one line, exit status 1, nothing written
    with pytest.raises(SystemExit) as stop:
        project_weights(["--out", str(tmp_path / "bad"), *script_overrides(tiny_wan_folder, "method.teacher_blocks=[7]")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.splitlines()[0].startswith("error: method.teacher_blocks=[7]: block 7 is out of range")
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
def test_projection_error_at_wan_1_3b_size(tmp_path):
    """The random-weight Wan2.1-1.3B folder (scripts/make_random_wan_folder.py), the half-depth student of
    model=wan_image_student, 480 x 832 latents, 512 text tokens, on the GPU: the numbers are printed (pytest -s)."""
    from scripts.make_random_wan_folder import main as make_folder

    folder = tmp_path / "wan-1.3b-random"
    make_folder(str(folder))
    report = project_weights(["--out", str(tmp_path / "student"), "--device", "cuda", "experiment=image_kd",
                              f"model.path={folder}"])
    assert report["teacher_layers"] == 30 and report["student_layers"] == 15
    assert report["teacher_blocks"] == default_blocks(30, 15)
    projected_error, random_error = report["projected"]["relative_error"], report["random_init"]["relative_error"]
    assert torch.isfinite(torch.tensor([projected_error, random_error])).all()
    assert projected_error < random_error
