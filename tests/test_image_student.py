"""The image student and method=image_kd (model/image_kd.py) on the tiny random Wan folder: WanImageDiT's one-frame
forward (no temporal RoPE, the video DiT's numbers), its diffusers-format round trip, the KD loss and gradient against
the formula, a few KD steps lowering the loss, sample PNGs beside the teacher's and inference PNGs, KD then DMD in one
run, and one-line errors for frames an image student cannot make."""

import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from safetensors.torch import load_file

import engine.inference as inference
import train
from engine.build import build_method
from engine.config import validate
from engine.student import group_overrides
from model.image_kd import ImageKD, ImageKDDMD
from model.wan.transformer import WanDiT, WanImageDiT
from model.wan.weights import load_backbone
from tests.train_setup import CONFIGS, compose_config
from tests.wan_folder import TRANSFORMER, Z_DIM, tiny_wan_folder  # noqa: F401  (session fixture)
from tests.wan_tiny import randomize

PROMPTS = ["a red circle moving left", "the blue car moving right", "a dog in the forest"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    torch.set_num_threads(1)
    for var in ("WAN_1_3B_PATH", "PROMPTS_PATH", "LATENTS_PATH"):
        monkeypatch.delenv(var, raising=False)


def prompt_file(tmp_path: Path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def kd_overrides(folder: Path, tmp_path: Path, *more: str, preset: str = "image_kd") -> list[str]:
    """The preset on the tiny folder: a 1-block student of the 2-block teacher, 4 x 4 latents (32 x 32 pixels)."""
    backbone = dict(TRANSFORMER, num_layers=1, patch_size=list(TRANSFORMER["patch_size"]))
    node = "{" + ",".join(f"{k}:{v}" for k, v in backbone.items()).replace("'", "").replace(" ", "") + "}"
    return [f"experiment={preset}", f"model.path={folder}", f"model.backbone={node}", "model.dtype=float32",
            f"model.latent_shape=[{Z_DIM},4,4]", "model.text_encoder.text_len=16", "device=cpu",
            f"data.prompts.path={prompt_file(tmp_path)}", "method.negative_prompt=the", "batch_size=2",
            "max_steps=2", "checkpoint.every=0", "eval.every=0", "eval.at_start=false", *more]


def kd_config(folder, tmp_path, *more, preset="image_kd"):
    return compose_config(*kd_overrides(folder, tmp_path, *more, preset=preset), tiny=False)


# ---------------------------------------------------------------------------- the network
def test_the_image_student_is_the_video_dit_on_one_frame_without_a_temporal_rope_axis():
    video = randomize(WanDiT(**TRANSFORMER), 3).eval()
    image = WanImageDiT(**TRANSFORMER).eval()
    state = video.state_dict()
    state["patch_embedding.weight"] = state["patch_embedding.weight"][:, :, 0]
    image.load_state_dict(state)
    assert isinstance(image.patch_embedding, torch.nn.Conv2d) and image.patch_embedding.weight.ndim == 4
    # RoPE: height and width rotate, the temporal channel pairs do not (cos 1, sin 0), at every call
    cos, sin = image._rope(0, 1, 3, 5, CPU)
    pairs = image.rope.t_dim // 2
    assert pairs == 2 and cos.shape == (15, 1, 4)
    assert torch.equal(cos[..., :pairs], torch.ones_like(cos[..., :pairs])) and not sin[..., :pairs].any()
    assert (sin[..., pairs:] != 0).any()  # the spatial axes do rotate
    assert all(torch.equal(a, b) for a, b in zip((cos, sin), video._rope(0, 1, 3, 5, CPU)))  # Wan at frame 0
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 1, Z_DIM, 6, 10, generator=gen), torch.randn(2, 7, 16, generator=gen)
    t = torch.tensor([[250.0], [900.0]])
    with torch.no_grad():
        want, got = video(x, t, context), image(x, t, context)
    assert got.shape == x.shape and (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_the_image_student_refuses_frames_and_time_causal_calls():
    from model.wan.attention import CausalPattern
    from model.wan.kv_cache import KVCache

    net = WanImageDiT(**TRANSFORMER).eval()
    x, t, context = torch.randn(1, 2, Z_DIM, 4, 4), torch.full((1, 2), 500.0), torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match=r"^WanImageDiT makes single images: x must be \[B, 1, C, H, W\], got num_frames=2$"):
        net(x, t, context)
    with pytest.raises(ValueError, match=r"no block-causal \(causal=\) or KV-cache \(kv_cache=\) mode"):
        net(x[:, :1], t[:, :1], context, causal=CausalPattern(1))
    cache = KVCache.for_model(WanDiT(**TRANSFORMER), CausalPattern(1), batch_size=1, latent_hw=(4, 4), max_frames=1)
    with pytest.raises(ValueError, match=r"no block-causal"):
        net(x[:, :1], t[:, :1], context, kv_cache=cache)


def test_export_and_load_round_trip_in_diffusers_format(tmp_path):
    net = randomize(WanImageDiT(**TRANSFORMER), 4).eval()
    net.save_pretrained(tmp_path / "student")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["_class_name"] == "WanImageDiT" and config["num_layers"] == 2
    weights = load_file(tmp_path / "student" / "diffusion_pytorch_model.safetensors")
    assert weights["patch_embedding.weight"].shape == (16, Z_DIM, 2, 2)  # 2-D, diffusers' names
    x, t, context = torch.randn(1, 1, Z_DIM, 4, 6), torch.tensor([300.0]), torch.randn(1, 3, 16)
    for loaded in (WanImageDiT.from_pretrained(tmp_path / "student"), load_backbone(tmp_path / "student", cls=WanImageDiT)):
        assert isinstance(loaded, WanImageDiT)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x, t, context), net(x, t, context))


def test_generator_init_may_be_a_video_dit_of_the_students_size(tiny_wan_folder, tmp_path):
    """Its patch kernel folded, everything else strictly as it is: the student is the video DiT at one frame."""
    overrides = ("method.project_init=false", f"model.generator_init={tiny_wan_folder}")
    method = build_method(kd_config(tiny_wan_folder, tmp_path, *overrides, "model.backbone.num_layers=2"), CPU)
    video = load_backbone(tiny_wan_folder).state_dict()
    for name, value in method.generator.state_dict().items():
        assert torch.equal(value, video[name][:, :, 0] if name == "patch_embedding.weight" else video[name]), name
    with pytest.raises(ValueError, match=r"does not match the model \(WanImageDiT\).*\n.*unexpected: blocks\.1\."):
        build_method(kd_config(tiny_wan_folder, tmp_path, *overrides), CPU)  # a 1-block student: no silent cut


# ---------------------------------------------------------------------------- the loss
def test_the_kd_loss_and_its_gradient_follow_the_formula(tiny_wan_folder, tmp_path):
    """L = mean (v_s(x_t) - [v_c + g (v_c - v_u)](x_t))^2, x_t = (1 - s) x0 + s eps, for each source of x0; the
    teacher gets no gradient; the student's gradient is the formula's."""
    batch = {"prompts": PROMPTS[:2]}
    for kd_input in ("noise", "student", "teacher", "latents"):
        cfg = kd_config(tiny_wan_folder, tmp_path, f"method.kd_input={'noise' if kd_input == 'latents' else kd_input}",
                        "method.guidance_scale=2.5")
        torch.manual_seed(0)
        method = build_method(cfg, CPU)
        if kd_input == "latents":
            batch = {"prompts": PROMPTS[:2], "latents": torch.randn(2, 1, Z_DIM, 4, 4)}
        method.reseed(0, 3, "kd", [6, 7])
        loss, logs = method.kd_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in method.generator.named_parameters()}
        assert all(p.grad is None for p in method.real_score.parameters())
        method.generator.zero_grad(set_to_none=True)
        # by hand, from the same draws
        method.reseed(0, 3, "kd", [6, 7])
        context, negative = method.encode(batch["prompts"]), method.encode(["the"]).expand(2, -1, -1)
        x0 = None
        if kd_input in ("student", "teacher"):
            noise0 = method.rng.randn((2, 1, Z_DIM, 4, 4))
            net = method.generator if kd_input == "student" else (
                lambda x, t, c: method.real_score(x, t, c) + 2.5 * (method.real_score(x, t, c) - method.real_score(x, t, negative)))
            x, sigmas = noise0, [s / 1000 for s in method.kd_steps] + [0.0]
            with torch.no_grad():
                for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # Euler on the flow
                    x = x + (s_next - s) * net(x, torch.full((2, 1), s * 1000), context)
            x0 = x
        elif kd_input == "latents":
            x0 = batch["latents"]
        t = method.score_timestep(2, 1, None)
        assert t.shape == (2, 1) and 20 <= t.min() and t.max() < 1000
        eps = method.rng.randn((2, 1, Z_DIM, 4, 4))
        x_t = eps if x0 is None else (1 - t[..., None, None, None] / 1000) * x0 + t[..., None, None, None] / 1000 * eps
        with torch.no_grad():
            v_c, v_u = method.real_score(x_t, t, context), method.real_score(x_t, t, negative)
        target = v_c + 2.5 * (v_c - v_u)
        hand = ((method.generator(x_t, t, context) - target) ** 2).mean()
        assert abs(hand.item() - loss.item()) <= 1e-5 * hand.item(), kd_input
        assert logs["kd_loss"].item() == loss.item() and logs["kd_timestep"].item() == pytest.approx(t.mean().item())
        hand.backward()
        worst = max((p.grad - grads[n]).abs().max().item() for n, p in method.generator.named_parameters())
        assert worst <= 1e-5 * max(g.abs().max().item() for g in grads.values()), kd_input


def heldout_loss(method: ImageKD) -> float:
    """The KD loss on fixed draws no training step makes (step 10**6), prompts of the file."""
    method.reseed(123, 10**6, "kd", [0, 1, 2])
    with torch.no_grad():
        return method.kd_loss({"prompts": PROMPTS})[0].item()


def test_a_few_kd_steps_lower_the_kd_loss(tiny_wan_folder, tmp_path):
    cfg = kd_config(tiny_wan_folder, tmp_path, "max_steps=30", "batch_size=3", "ema_weight=0",
                    "optim.generator.lr=3e-3", "optim.generator.weight_decay=0")
    validate(cfg)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, CPU)
    before = heldout_loss(method)
    train.train(cfg, tmp_path / "run")
    method.generator.load_state_dict(load_file(tmp_path / "run" / "checkpoints" / "step_000030" / "export" / "model.safetensors"))
    after = heldout_loss(method)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "kd_loss" in line]
    assert [r["step"] for r in rows] == [10, 20, 30]
    # measured: 0.320 before (the projected 1-block student of the 2-block teacher), 0.046 after 30 steps
    assert before == pytest.approx(0.320, abs=0.01) and after == pytest.approx(0.046, abs=0.01), (before, after)
    assert after < 0.2 * before


# ---------------------------------------------------------------------------- images
def test_training_writes_sample_pngs_beside_the_teachers_and_inference_writes_pngs(tiny_wan_folder, tmp_path):
    (tmp_path / "eval").mkdir()
    evals = prompt_file(tmp_path / "eval", PROMPTS[:2])
    cfg = kd_config(tiny_wan_folder, tmp_path, f"eval.prompts={evals}", "eval.seeds=[0,1]", "eval.every=1",
                    "eval.teacher_steps=3", "max_steps=1", "ema_start_step=0")
    run = tmp_path / "run"
    train.train(cfg, run)
    names = ["p00_s0.png", "p00_s1.png", "p01_s0.png", "p01_s1.png"]
    for folder in ("teacher", "step_000001"):
        index = json.loads((run / "samples" / folder / "index.json").read_text())
        assert [it["file"] for it in index["items"]] == names and index["grid"] == "grid.png"
        for name in names:
            assert iio.imread(run / "samples" / folder / name).shape == (32, 32, 3)  # 4 x 4 latents, the VAE's 8x
        assert not list((run / "samples" / folder).glob("*.mp4"))
    # the grid: each student image beside the teacher's (4 columns: 2 seeds x [student, teacher]), 2 prompts
    grid = iio.imread(run / "samples" / "step_000001" / "grid.png")
    cell = 416  # engine/validation.py GRID_CELL: 32 px upscaled 13x
    assert grid.shape[1] == 4 * (cell + 4) + 4 and grid.shape[0] > 2 * cell
    teacher_grid = iio.imread(run / "samples" / "teacher" / "grid.png")
    assert teacher_grid.shape[1] == 2 * (cell + 4) + 4
    # inference.py on the export: PNGs and index.json, the validation images themselves (same noise keys)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        icfg = compose("inference", overrides=["device=cpu", f"checkpoint={run}", f"prompts={evals}", "seed=[0,1]",
                                               "batch_size=1"])  # validation's batches of one: the same arithmetic
    index = inference.run(icfg, tmp_path / "out", group_overrides([]))
    files = [it["file"] for it in index["items"]]
    assert index["format"] == "png" and index["num_frames"] == 1 and len(files) == 4
    assert all(f.endswith(".png") for f in files) and (tmp_path / "out" / "index.json").is_file()
    for produced, validated in zip(files, names):
        a, b = iio.imread(tmp_path / "out" / produced), iio.imread(run / "samples" / "step_000001" / validated)
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    # a second inference into the same folder finds the earlier PNGs
    assert sorted(p.name for p in inference.earlier_run(tmp_path / "out")) == sorted(files + ["index.json"])


def test_kd_then_dmd_in_one_run(tiny_wan_folder, tmp_path):
    cfg = kd_config(tiny_wan_folder, tmp_path, "method.kd_steps=1", "dfake_gen_update_ratio=1", "max_steps=2",
                    "method.denoising_step_list=[1000,500]", "logger.every=1", preset="image_kd_dmd")
    validate(cfg)
    assert cfg.method._target_ == "model.image_kd.ImageKDDMD" and cfg.method.renoise == "fresh"
    train.train(cfg, tmp_path / "run")
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "step" in r}
    assert "kd_loss" in rows[1] and "generator_loss" not in rows[1]  # step 0: KD
    assert {"generator_loss", "critic_loss"} <= set(rows[2]) and "kd_loss" not in rows[2]  # step 1: DMD
    assert issubclass(ImageKDDMD, ImageKD) and "critic" in ImageKDDMD.networks and "critic" not in ImageKD.networks


# ---------------------------------------------------------------------------- errors
def test_frames_an_image_student_cannot_make_are_one_line_errors(tiny_wan_folder, tmp_path):
    for key, value in (("num_training_frames", 3), ("num_frame_per_block", 3), ("max_num_frames", 2)):
        with pytest.raises(ValueError, match=rf"^method.{key}={value}: an image student makes one") as error:
            validate(kd_config(tiny_wan_folder, tmp_path, f"method.{key}={value}"))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"method.teacher_blocks=\[0, 9\]") as error:
        build_method(kd_config(tiny_wan_folder, tmp_path, "model.backbone.num_layers=2", "method.teacher_blocks=[0,9]"), CPU)
    assert "block 9 is out of range; the teacher has blocks 0..1" in str(error.value)
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is wider than the teacher's 2"):
        build_method(kd_config(tiny_wan_folder, tmp_path, "model.backbone.num_attention_heads=4"), CPU)
    with pytest.raises(ValueError, match=r"model.generator_init=.* and method.project_init=true both say"):
        build_method(kd_config(tiny_wan_folder, tmp_path, f"model.generator_init={tiny_wan_folder}"), CPU)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InstantiationException, match=r"prompt file .*empty.txt holds no prompts"):  # Hydra's wrapper
        train.train(kd_config(tiny_wan_folder, tmp_path, f"data.prompts.path={empty}"), tmp_path / "empty_run")
    # inference: an image student asked for frames
    cfg = kd_config(tiny_wan_folder, tmp_path, "max_steps=1")
    train.train(cfg, tmp_path / "run")
    for bad, message in (("num_frames=3", r"^num_frames=3: this checkpoint is an image student \(WanImageDiT\), which "
                                          r"makes one frame; leave num_frames unset \(or 1\)$"),
                         ("duration=2", r"image student \(WanImageDiT\), which makes single images: timelines")):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            icfg = compose("inference", overrides=["device=cpu", f"checkpoint={tmp_path / 'run'}", "prompts=[a cat]", bad])
        with pytest.raises(ValueError, match=message):
            inference.run(icfg, tmp_path / "out_bad", group_overrides([]))
        assert not (tmp_path / "out_bad").exists()


# ---------------------------------------------------------------------------- the toy preset
def test_the_toy_preset_trains_resumes_exactly_exports_and_inference_scores_its_pngs(tmp_path):
    """experiment=image_kd_toy: 4 steps straight equal 2 steps + resume + 2; the export's PNGs scored by inference.py
    against the one-frame templates (the folded denoiser after 4 steps matches none: docs/image_student.md)."""
    from tests.test_train import checkpoint_tensors

    common = ("experiment=image_kd_toy", "batch_size=2", "eval.every=0", "eval.at_start=false", "checkpoint.keep=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(compose_config(*common, "max_steps=4", "checkpoint.every=2", tiny=False), straight)
    train.train(compose_config(*common, "max_steps=2", tiny=False), resumed)
    train.train(compose_config(*common, "max_steps=4", "checkpoint.every=2", "resume=latest", tiny=False), resumed)
    a = checkpoint_tensors(straight / "checkpoints" / "step_000004", tmp_path)
    b = checkpoint_tensors(resumed / "checkpoints" / "step_000004", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith(".ema") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    metrics = "data.metrics={match_tolerance_px:1.0,match_threshold:null,samples_per_prompt:1,long_num_frames:1,teacher_steps:50}"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        icfg = compose("inference", overrides=["device=cpu", f"checkpoint={straight}", "batch_size=4", metrics,
                                               "prompts=[a red circle moving left,a blue square moving up]", "seed=[0,1]"])
    index = inference.run(icfg, tmp_path / "out", group_overrides([metrics]))
    assert index["format"] == "png" and len(index["items"]) == 4
    assert iio.imread(tmp_path / "out" / index["items"][0]["file"]).shape == (16, 16, 3)
    toy = index["toy_metrics"]
    assert toy["match_rate"] == 0.0 and 0.3 < toy["mean_distance"] < 0.45, toy


def test_training_scores_the_toy_presets_images_as_inference_does(tmp_path):
    """experiment=image_kd_toy: every eval.every steps metrics.jsonl gets the EMA student's one-frame images scored
    against the one-frame templates, after the exact teacher's row at one frame. They must equal inference.py's
    toy_metrics of the export with the run's seed: the export is the EMA weights evaluated, the sampler is the same
    function (model/image_kd.py sample_images), item i draws from the key (seed, 0, "eval", i) in both, and one batch of
    all 48 images is the same arithmetic, so the numbers agree to the bit. A match threshold of 0.36 lets a few of
    the folded denoiser's blurred shapes match (the preset's one-pixel rule matches none after 2 steps), so match rate
    and coverage are compared away from zero."""
    from engine.evaluation import evaluate_toy

    run, threshold = tmp_path / "run", "data.metrics.match_threshold=0.36"
    cfg = compose_config("experiment=image_kd_toy", "batch_size=2", "max_steps=2", "eval.every=1", "eval.at_start=false",
                         "ema_start_step=0", "checkpoint.every=0", "data.metrics.samples_per_prompt=1", threshold, tiny=False)
    assert cfg.data.metrics.long_num_frames == 1 and cfg.data.metrics.teacher_steps == 50
    train.train(cfg, run)
    teacher, *students = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert teacher["source"] == "exact_teacher_50_steps" and [r["step"] for r in students] == [1, 2]
    for row in (teacher, *students):
        assert row["num_frames"] == row["long_num_frames"] == 1 and row["num_samples"] == 48
        for key in ("match_rate", "coverage", "mean_distance"):
            assert math.isfinite(row[key]) and 0 <= row[key] <= 1 and row[f"long_{key}"] == row[key], (key, row)
    # measured: the exact teacher matches 37 of 48 (its misses are all pictures that are also another prompt's
    # template: at one frame, 32 of the 288 templates repeat one of the same colour and shape moving another way,
    # and float noise picks the nearest); the student 3 of 48, 0.353 from the nearest template
    assert teacher["match_rate"] == 37 / 48 and teacher["mean_distance"] < 1e-6
    last = students[-1]
    assert last["match_rate"] == 3 / 48 and 0 < last["coverage"] < 0.1 and 0.3 < last["mean_distance"] < 0.4, last
    assert (run / "samples" / "step_000002.png").is_file() and not list((run / "samples").glob("*.mp4"))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        icfg = compose("inference", overrides=["device=cpu", f"checkpoint={run}", "seed=0", "batch_size=48"])
    index = inference.run(icfg, tmp_path / "out", group_overrides([]))  # prompts null: the world's, as evaluation's
    toy = index["toy_metrics"]
    assert index["format"] == "png" and len(index["items"]) == 48 and toy["threshold"] == 0.36
    assert {k: v for k, v in toy.items() if k != "coverage_per_prompt"} == {k: last[k] for k in toy if k in last}
    assert set(toy) - set(last) == {"coverage_per_prompt"}
    # the toy metrics of an image student at more than one frame: a one-line error naming the key
    long = compose_config("experiment=image_kd_toy", "data.metrics.long_num_frames=36", tiny=False)
    method = build_method(long, CPU)
    with pytest.raises(ValueError, match=r"^an image student \(WanImageDiT\) makes one frame, but the toy evaluation "
                                         r"asks for 1 \(eval.num_frames\) and 36 \(data.metrics.long_num_frames\): set "
                                         r"data.metrics.long_num_frames=1 and leave eval.num_frames null$"):
        evaluate_toy(method, None, long.data, 0, 0, tmp_path, 1, teacher=True)


# ---------------------------------------------------------------------------- the GPU benchmark's CPU path
def test_bench_image_runs_its_gpu_code_path_on_the_tiny_folder(tmp_path, capsys):
    """scripts/bench_image.py --tiny --device cpu: a KD step through bench_train's `bench` (the trainer's run_phase),
    then one image of each sampler through inference's generate_images: the KD student's 50 Euler steps and
    experiment=image_kd_dmd's 4 re-noised steps, on the tests' tiny folder; the JSON, and the markdown table."""
    from scripts import bench_image

    out = tmp_path / "bench.json"
    args = ["--tiny", "--device", "cpu", "--root", str(tmp_path / "assets"), "--steps", "2", "--repeats", "2",
            "--out", str(out)]
    result = bench_image.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    student = WanImageDiT(**dict(TRANSFORMER, num_layers=1))
    assert (result["teacher_layers"], result["student_layers"]) == (2, 1) and result["dtype"] == "float32"
    assert result["student_params"] == sum(p.numel() for p in student.parameters()) and result["batch_size"] == 2
    kd = result["kd"]
    assert len(kd["kd_step_all_s"]) == 3 and 0 < kd["kd_step_s"] < 30 and "peak_allocated_gib_per_gpu" not in kd  # CPU
    images = result["sampling"]["images"]
    assert [(r["steps"], r["renoise"], r["pixels"], r["finite"]) for r in images.values()] == [
        (50, "implied", [32, 32], True), (4, "fresh", [32, 32], True)]
    assert all(len(r["image_all_s"]) == 3 and 0 < r["decode_s"] < r["image_s"] for r in images.values())
    # 50 generator calls against 4 (measured 0.065 s and 0.013 s on the shared CPU): the step lists were used
    assert images["kd_50_steps"]["image_s"] > 2 * images["dmd_4_steps"]["image_s"]
    printed = capsys.readouterr().out
    assert "| KD step (batch 2, median of 2) |" in printed and "| 4-step image, 32 x 32 (image_kd_dmd; decode" in printed
    with pytest.raises(SystemExit, match=r"^need --steps >= 1, --repeats >= 1 and --warmup >= 0, got 0, 2, 1$"):
        bench_image.main([*args, "--steps", "0"])
