"""Training on Wan through the real loaders, on the tiny random Wan folder: model=wan2.1_t2v_1.3b
with the presets, prompt / latent / ODE-pair data, the data scripts, and the folder errors."""

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

import train
from model.ode_regression import ODERegression
from model.schedule import FlowSchedule
from model.wan.weights import load_backbone
from pipeline.ode import sigma_grid
from scripts.encode_videos import encode_videos, list_videos, load_clip, read_prompt_map
from scripts.generate_ode_pairs import generate_ode_pairs
from scripts.generate_ode_pairs import main as generate_ode_pairs_cli
from tests.train_setup import compose_config
from tests.wan_folder import Z_DIM, tiny_wan_folder  # noqa: F401  (session fixture)
from engine.build import build_method
from utils.data import Batches
from engine.config import validate
from utils.data import LatentShards, ODEPairShards, PromptFile
from utils.sample_rng import SampleRNG

CPU = torch.device("cpu")
PROMPTS = ["a red circle moving left", "the blue car moving right", "a dog in the forest"]
H = W = 4  # latent frame size: 32 x 32 pixels through the tiny VAE's 8x


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    torch.set_num_threads(1)
    for var in ("WAN_1_3B_PATH", "WAN_14B_PATH", "WAN_ODE_INIT", "PROMPTS_PATH", "LATENTS_PATH", "ODE_PAIRS_PATH"):
        monkeypatch.delenv(var, raising=False)


def wan_overrides(folder, *overrides, preset="self_forcing_dmd") -> list[str]:
    """A preset on the tiny folder: 2 latent frames in blocks of 1, 2 student steps, batch 1, 2 steps."""
    return [
        f"experiment={preset}", f"model.path={folder}", "model.dtype=float32", f"model.latent_shape=[{Z_DIM},{H},{W}]",
        "model.gradient_checkpointing=false", "device=cpu", "method.num_training_frames=2",
        "method.num_frame_per_block=1", "method.denoising_step_list=[1000,500]", "batch_size=1",
        "total_batch_size=null", "max_steps=2", "checkpoint.every=0", "eval.every=0", "eval.at_start=false",
        "data.metrics=null", *overrides,
    ]


def wan_config(folder, *overrides, preset="self_forcing_dmd"):
    return compose_config(*wan_overrides(folder, *overrides, preset=preset), tiny=False)


def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:], "  "]) + "\n")
    return path


def max_change(export: Path, folder: Path) -> float:
    """Largest |exported - initial| weight, after loading the export back as a Wan backbone."""
    trained, initial = load_backbone(export, config=folder), load_backbone(folder)
    assert all(torch.isfinite(p).all() for p in trained.state_dict().values())
    before = initial.state_dict()
    return max((v - before[k]).abs().max().item() for k, v in trained.state_dict().items())


def test_prompt_encoding_pads_with_zeros_and_encodes_the_negative_prompt_once(tiny_wan_folder):
    method = build_method(wan_config(tiny_wan_folder), CPU)
    calls = []
    encoder, forward = method.text_encoder, method.text_encoder.forward
    encoder.forward = lambda prompts: calls.append(list(prompts)) or forward(prompts)
    context = method.encode(PROMPTS[:2])
    assert context.shape == (2, 512, 16) and context.dtype == torch.float32
    for row, prompt in zip(context, PROMPTS[:2]):
        n = len(prompt.split()) + 1  # the words, then </s>
        assert (row[:n].norm(dim=1) > 0).all() and (row[n:] == 0).all()
    first, again = method.negative(2), method.negative(3)
    assert method.cfg.negative_prompt.startswith("色调艳丽，过曝，静态")  # Wan's, from the preset
    assert len(calls) == 2 and calls[1] == [method.cfg.negative_prompt]  # encoded once, at first use
    assert first.shape == (2, 512, 16) and again.shape == (3, 512, 16)
    assert first.data_ptr() == again.data_ptr() == method._negative.data_ptr()  # the same cached tensor
    n = len(encoder.tokenizer(method.cfg.negative_prompt)["input_ids"])
    assert (first[0, :n].norm(dim=1) > 0).all() and (first[0, n:] == 0).all()


def test_two_self_forcing_dmd_steps_write_a_loadable_export(tiny_wan_folder, tmp_path):
    cfg = wan_config(tiny_wan_folder, f"data.prompts.path={prompt_file(tmp_path)}", "model.text_encoder.text_len=16")
    validate(cfg)
    assert cfg.model.generator_init == str(tiny_wan_folder)  # no ODE init given: Wan's own weights
    run_dir = tmp_path / "run"
    train.train(cfg, run_dir)
    export = run_dir / "checkpoints" / "step_000002" / "export" / "model.safetensors"
    # One generator update in 2 steps (dfake_gen_update_ratio 5); Adam's first step moves weights by ~lr.
    lr = cfg.optim.generator.lr
    assert abs(max_change(export, tiny_wan_folder) - lr) < 0.05 * lr


def test_ode_pairs_are_sharded_per_rank_and_train_the_student(tiny_wan_folder, tmp_path, monkeypatch):
    overrides = ("method.ode_steps=3", "method.ode_guidance_scale=2.0", "model.text_encoder.text_len=16")
    cfg = wan_config(tiny_wan_folder, *overrides, preset="ode_init")
    one = generate_ode_pairs(cfg, PROMPTS, tmp_path / "one", shard_size=2, batch_size=2, rank=0, world_size=1, device=CPU)
    assert [p.name for p in one] == ["shard_00000000.safetensors", "shard_00000002.safetensors"]
    for rank in (0, 1):  # two ranks, one shard each, one item at a time: the same pairs
        written = generate_ode_pairs(cfg, PROMPTS, tmp_path / "two", shard_size=2, rank=rank, world_size=2, device=CPU)
        assert [p.name for p in written] == [one[rank].name]
    for a, b in zip(one, sorted((tmp_path / "two").glob("*.safetensors"))):
        assert torch.allclose(load_file(a)["ode"], load_file(b)["ode"], atol=1e-5)
    # the command line (one process) writes the same shards
    generate_ode_pairs_cli(["--prompts", str(prompt_file(tmp_path)), "--out", str(tmp_path / "cli"), "--shard-size", "2",
                            "--batch-size", "2", *wan_overrides(tiny_wan_folder, *overrides, preset="ode_init")])
    cli = sorted((tmp_path / "cli").glob("*.safetensors"))
    assert [p.name for p in cli] == [p.name for p in one]
    for a, b in zip(one, cli):
        assert torch.allclose(load_file(a)["ode"], load_file(b)["ode"], atol=1e-5)

    pairs = instantiate(wan_config(tiny_wan_folder, f"data.ode_pairs.path={tmp_path / 'one'}", preset="ode_init").data.ode_pairs)
    assert isinstance(pairs, ODEPairShards) and len(pairs) == 3 and pairs.prompts == PROMPTS
    item = pairs[2]
    assert item["prompts"] == PROMPTS[2] and item["ode"].shape == (3, 2, Z_DIM, H, W)  # [S+1, F, C, H, W]
    # The state at t=1000 is item 2's own noise stream; the clip is the teacher's CFG Euler ODE, recomputed here.
    noise = SampleRNG.for_samples(cfg.seed, 0, "ode_pairs", [2], CPU).randn((1, 2, Z_DIM, H, W))[0]
    assert torch.equal(item["ode"][0], noise)
    method = build_method(cfg, CPU)
    cond, uncond = method.encode([PROMPTS[2]]), method.encode([cfg.method.negative_prompt])
    x = noise[None]
    grid = sigma_grid(3, 5.0, include=[t / 1000 for t in FlowSchedule(5.0).denoising_steps([1000, 500], True)])
    for s, s_next in zip(grid[:-1], grid[1:]):
        t = torch.full((1, 2), s * 1000.0)
        v_c, v_u = method.real_score(x, t, cond), method.real_score(x, t, uncond)
        x = x + (s_next - s) * (v_u + 2.0 * (v_c - v_u))
    assert len(grid) == 5 and torch.allclose(item["ode"][-1], x[0], atol=1e-5)

    batch = Batches(pairs, 2, 1, 1).get(0, 0, 0)[1]
    assert batch["ode"].shape == (2, 3, 2, Z_DIM, H, W) and batch["prompts"] == PROMPTS[:2]

    # 2 ODE-regression steps on the pairs (never on the fly), from the Wan weights, at lr 1e-3.
    monkeypatch.setattr(ODERegression, "teacher_trajectory", lambda *a: pytest.fail("sampled on the fly"))
    cfg = wan_config(tiny_wan_folder, f"data.ode_pairs.path={tmp_path / 'one'}", "optim.generator.lr=1e-3",
                     "optim.generator.weight_decay=0", *overrides, preset="ode_init")
    validate(cfg)
    train.train(cfg, tmp_path / "ode_run")
    change = max_change(tmp_path / "ode_run" / "checkpoints" / "step_000002" / "export" / "model.safetensors", tiny_wan_folder)
    # Two Adam steps: the first moves each weight by lr, the second by at most 1.0013 lr (betas 0.9, 0.999).
    assert 1e-3 < change <= 2.0014e-3


def test_pairs_made_for_other_settings_are_refused(tiny_wan_folder, tmp_path):
    cfg = wan_config(tiny_wan_folder, "method.ode_steps=2", "model.text_encoder.text_len=16", preset="ode_init")
    generate_ode_pairs(cfg, PROMPTS[:1], tmp_path, rank=0, world_size=1, device=CPU)
    with pytest.raises(ValueError, match="2 student-step states per item, but this run's denoising_step_list has 3"):
        ODEPairShards(tmp_path, expect={"denoising_step_list": [1000, 750, 500]})
    with pytest.raises(ValueError, match="timestep_shift=5.0, but this run needs timestep_shift=3.0"):
        ODEPairShards(tmp_path, expect={"timestep_shift": 3.0})
    with pytest.raises(ValueError, match="num_frames=2, but this run needs num_frames=21"):
        ODEPairShards(tmp_path, expect={"num_frames": 21})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no shard_"):
        ODEPairShards(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        ODEPairShards(tmp_path / "missing")


def _write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=8)


def test_encoded_videos_become_latent_shards_that_causvid_trains_on(tiny_wan_folder, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    ramp = np.stack([np.full((40, 48, 3), 20 * i, np.uint8) for i in range(12)])  # frame i is grey 20 i
    _write_video(videos / "ramp.mp4", ramp, fps=32)
    _write_video(videos / "red.mp4", np.broadcast_to(np.array([200, 40, 40], np.uint8), (8, 40, 48, 3)).copy(), fps=16)
    (tmp_path / "captions.csv").write_text(f"file,caption\nramp.mp4,{PROMPTS[0]}\nred.mp4,{PROMPTS[1]}\n")
    items = list_videos(videos, read_prompt_map(tmp_path / "captions.csv"))
    assert [(f.name, p) for f, p in items] == [("ramp.mp4", PROMPTS[0]), ("red.mp4", PROMPTS[1])]

    # 32 -> 16 fps keeps every other frame: greys 0, 40, 80, 120, 160; the 40 x 48 frame is cropped to 32 x 32.
    clip = load_clip(videos / "ramp.mp4", 5, 32, 32, fps=16)
    assert clip.shape == (5, 3, 32, 32)
    expected = torch.tensor([40.0 * k / 127.5 - 1 for k in range(5)])
    assert (clip.mean(dim=(1, 2, 3)) - expected).abs().max() < 0.03
    red = load_clip(videos / "red.mp4", 5, 32, 32, fps=16).mean(dim=(0, 2, 3))
    assert (red - torch.tensor([200, 40, 40]) / 127.5 + 1).abs().max() < 0.05

    cfg = wan_config(tiny_wan_folder, f"data.videos.path={tmp_path / 'latents'}", "model.text_encoder.text_len=16",
                     preset="causvid")
    encode_videos(cfg, items, tmp_path / "latents", fps=16, rank=0, world_size=1, device=CPU)
    data = instantiate(cfg.data.videos)
    assert isinstance(data, LatentShards) and len(data) == 2 and data.prompts == PROMPTS[:2]
    assert data[0]["latents"].shape == (2, Z_DIM, H, W)  # 5 pixel frames -> 2 latent frames
    vae = instantiate(cfg.model.vae)
    assert torch.equal(data[0]["latents"], vae.encode(clip[None])[0])

    validate(cfg)
    train.train(cfg, tmp_path / "causvid_run")
    weights = load_file(tmp_path / "causvid_run" / "checkpoints" / "step_000002" / "export" / "model.safetensors")
    assert len(weights) > 0 and all(torch.isfinite(w).all() for w in weights.values())


def test_missing_folder_or_file_is_named_before_anything_loads(tiny_wan_folder, tmp_path, monkeypatch):
    import model.wan.text_encoder as te

    monkeypatch.setattr(te.UMT5EncoderModel, "from_pretrained", lambda *a, **k: pytest.fail("UMT5 loaded first"))
    nowhere = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    for check in (validate, lambda cfg: build_method(cfg, CPU)):
        with pytest.raises(FileNotFoundError, match=f"Wan folder {nowhere} does not exist.*\n.*Expected a diffusers"):
            check(wan_config(nowhere))
    broken = shutil.copytree(tiny_wan_folder, tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken is missing vae/diffusion_pytorch_model\*\.safetensors.*"
                                               r"\n(.*\n)*    vae/ +config.json"):
        build_method(wan_config(broken), CPU)
    no_14b = tmp_path / "Wan2.1-T2V-14B-Diffusers"
    cfg = wan_config(tiny_wan_folder, "model=wan2.1_t2v_1.3b_teacher14b", f"model.teacher_path={no_14b}")
    with pytest.raises(FileNotFoundError, match=f"Wan folder {no_14b} does not exist"):
        validate(cfg)


def test_14b_teacher_config_keeps_a_1_3b_critic(tiny_wan_folder):
    # The tiny folder stands in for both sizes: the critic must come from `path`, not be the teacher's copy.
    cfg = wan_config(tiny_wan_folder, "model=wan2.1_t2v_1.3b_teacher14b", f"model.teacher_path={tiny_wan_folder}")
    assert cfg.model.critic_init == str(tiny_wan_folder)
    validate(cfg)
    method = build_method(cfg, CPU)
    base = load_backbone(tiny_wan_folder).state_dict()
    critic = method.fake_score.state_dict()
    assert method.fake_score is not method.real_score and all(torch.equal(critic[k], v) for k, v in base.items())
    assert all(p.requires_grad for p in method.fake_score.parameters())
    assert not any(p.requires_grad for p in method.real_score.parameters())


def test_prompt_file_reads_lines_and_refuses_empty_or_missing_files(tmp_path):
    prompts = PromptFile(prompt_file(tmp_path))
    assert len(prompts) == 3 and [prompts[i] for i in range(3)] == PROMPTS  # blank lines skipped
    assert Batches(prompts, 2, 2, 1).get(0, 0, 1)[1] == {"prompts": [PROMPTS[2], PROMPTS[0]]}  # rank 1, wrapping
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(ValueError, match=f"prompt file {tmp_path / name} holds no prompts"):
            PromptFile(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=f"prompt file {tmp_path / 'missing.txt'} does not exist"):
        PromptFile(tmp_path / "missing.txt")


def test_inference_streams_mp4s_from_the_wan_run(tiny_wan_folder, tmp_path):
    """The DMD run's export through inference.py on the Wan loaders: UMT5 prompts, WanVAE streaming decode, mp4."""
    import imageio.v3 as iio
    from hydra import compose, initialize_config_dir

    from tests.train_setup import CONFIGS
    from engine import inference

    cfg = wan_config(tiny_wan_folder, f"data.prompts.path={prompt_file(tmp_path)}", "model.text_encoder.text_len=16")
    run_dir = tmp_path / "run"
    train.train(cfg, run_dir)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        icfg = compose("inference", overrides=[
            "device=cpu", f"checkpoint={run_dir}", "prompts=[a cat, a dog]", "num_frames=3", "save_latents=true",
        ])
    out = tmp_path / "videos"
    index = inference.run(icfg, out, [])
    assert len(index["items"]) == 2
    for item in index["items"]:
        frames = iio.imread(out / item["file"], index=None)
        # 3 latent frames -> 1 + 4 x 2 pixel frames through the streaming WanVAE decoder
        assert frames.shape[0] == 1 + 4 * 2 and frames.shape[-1] == 3
    assert index["throughput_fps"] > 0 and index["first_chunk_latency_s"] > 0
