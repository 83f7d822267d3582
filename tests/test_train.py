"""train.py end to end at tiny size: presets compose, resume is exact, accumulation is exact, errors are clear."""

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train
from tests.train_setup import CONFIGS, compose_config
from engine.build import build_method
from engine.config import validate


def checkpoint_tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (models, optimizers, EMA) as one flat dict."""
    out = tmp / f"{step_dir.parent.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    flat = {}

    def walk(prefix, tree):
        if isinstance(tree, torch.Tensor):
            flat[prefix] = tree
        elif isinstance(tree, dict):
            for k, v in tree.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                walk(f"{prefix}.{i}", v)

    walk("", torch.load(out, weights_only=False))
    return flat


def run(tmp_path: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    run_dir = tmp_path / name
    cfg = compose_config(*overrides)
    validate(cfg)
    return run_dir, train.train(cfg, run_dir)


PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in (CONFIGS / "ablation").glob("*.yaml"))


# an ablation of a method's own knob overlays a preset of that method (the default experiment is DMD)
ABLATION_BASE = {"fdiv_": "experiment=toy_fdistill_js", "gan_": "experiment=toy_dmd2_gan"}


@pytest.mark.parametrize("overlay", [f"experiment={p}" for p in PRESETS] + [f"ablation={a}" for a in ABLATIONS])
def test_every_preset_and_ablation_composes_and_builds_at_tiny_size(overlay):
    base = [e for prefix, e in ABLATION_BASE.items() if overlay.startswith(f"ablation={prefix}")]
    image = overlay.startswith("experiment=image_kd")  # one-frame students: no 6-frame clips, no projection from a folder
    cfg = compose_config(*base, overlay, "model=toy", "data=toy", tiny=not image)
    # the preset's own sizes, shrunk back to the tiny toy ones after the preset applied
    if "gan" in cfg.method:
        cfg.method.gan.blocks = None  # Wan's [13, 21, 29]: the tiny critic's default instead
    cfg.model.precision.text_encoder = None  # an int8 UMT5's: the toy text encoder has no linear layers to quantise
    if image:
        cfg.method.project_init = False
    else:
        cfg.method.num_training_frames = 6
        cfg.method.min_num_frames = cfg.method.max_num_frames = None
        cfg.method.num_frame_per_block = min(cfg.method.num_frame_per_block, 2)
    validate(cfg)
    method = build_method(cfg, torch.device("cpu"))
    assert method.steps[0] == 1000 and len(method.steps) == len(cfg.method.denoising_step_list)
    assert sum(p.numel() for p in method.generator.parameters()) > 0


def test_presets_exist():
    assert {"self_forcing_dmd", "self_forcing_sid", "causvid"} <= set(PRESETS)
    assert len(ABLATIONS) >= 6


def test_resume_equals_uninterrupted_training(tmp_path):
    common = ("max_steps=4", "checkpoint.every=2")
    straight, _ = run(tmp_path, "straight", *common)
    half, _ = run(tmp_path, "resumed", "max_steps=2")
    assert (half / "checkpoints" / "step_000002").is_dir()
    resumed, _ = run(tmp_path, "resumed", *common, "resume=latest")
    a = checkpoint_tensors(straight / "checkpoints" / "step_000004", tmp_path)
    b = checkpoint_tensors(resumed / "checkpoints" / "step_000004", tmp_path)
    assert a.keys() == b.keys()
    assert any(k.startswith(".ema") for k in a) and any("generator_optim" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # and training really changed the weights
    first = checkpoint_tensors(straight / "checkpoints" / "step_000002", tmp_path)
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith(".generator."))


def test_gradient_accumulation_equals_the_larger_batch():
    """2 micro-batches of 1 give the gradients of one batch of 2: noise is keyed by sample, not by split."""
    from engine.build import build_optimizer
    from engine.trainer import DataSources, Optimized, run_phase
    from utils.distributed import init_distributed

    cfg = compose_config("optim.generator.lr=0", "optim.critic.lr=0")
    dist = init_distributed()
    grads = {}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        torch.manual_seed(0)
        method = build_method(cfg, torch.device("cpu"))
        data = DataSources(cfg.data, batch_size, 1, accumulation)
        optimized = {name: Optimized(net, *build_optimizer(net.parameters(), cfg.optim.generator, 1), cfg.optim.generator)
                     for name, net in (("generator", method.generator), ("critic", method.fake_score))}
        for phase in type(method).phases:
            run_phase(method, phase, optimized, data, 3, cfg.seed, dist, accumulation)
            net = optimized[phase.updates[0]].net
            grads[(batch_size, phase.name)] = {n: p.grad.clone() for n, p in net.named_parameters()}
    for phase in ("generator", "critic"):
        a, b = grads[(2, phase)], grads[(1, phase)]
        scale = max(g.abs().max().item() for g in a.values())
        worst = max((a[n] - b[n]).abs().max().item() for n in a) / scale
        assert scale > 0 and worst <= 1e-6, (phase, worst)


@pytest.mark.parametrize("method", ["dmd", "sid", "causvid", "ode_regression"])
def test_each_method_trains_a_few_steps_on_the_toy_world(tmp_path, method):
    run_dir, _ = run(tmp_path, method, f"method={method}", "max_steps=2", "checkpoint.every=0")
    export = run_dir / "checkpoints" / "step_000002" / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    from safetensors.torch import load_file

    weights = load_file(export / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_log_rows_hold_the_updates_since_the_last_row(tmp_path):
    """The generator updates every 2nd step: its values are in the rows of those steps only (not repeated
    on critic-only steps); with logger.every=2 every row holds both networks' latest values."""
    import json

    rows = {}
    for every in (1, 2):
        run_dir, _ = run(tmp_path, f"every{every}", "max_steps=4", "dfake_gen_update_ratio=2", f"logger.every={every}",
                         "checkpoint.every=0", "eval.every=0", "eval.at_start=false")
        lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        rows[every] = {r["step"]: r for r in lines if "critic_loss" in r}
    assert sorted(rows[1]) == [1, 2, 3, 4] and sorted(rows[2]) == [2, 4]
    assert [("generator_loss" in rows[1][s]) for s in (1, 2, 3, 4)] == [True, False, True, False]
    for s in (2, 4):  # the same runs: a row of every 2 steps carries the generator's update of the step before
        assert rows[2][s]["generator_loss"] == rows[1][s - 1]["generator_loss"]
        assert rows[2][s]["critic_loss"] == rows[1][s]["critic_loss"]


def test_a_method_without_critic_schedules_its_learning_rate_over_every_step(tmp_path):
    # ODE regression updates the generator every step, so a cosine schedule must span max_steps
    # updates, not max_steps / dfake_gen_update_ratio (which left the learning rate at 0 after that)
    run_dir, _ = run(tmp_path, "ode", "method=ode_regression", "max_steps=4", "dfake_gen_update_ratio=4",
                     "optim.generator.schedule=cosine", "ema_weight=0", "checkpoint.every=1")
    from safetensors.torch import load_file

    third, last = (load_file(run_dir / "checkpoints" / f"step_00000{s}" / "export" / "model.safetensors") for s in (3, 4))
    assert any(not torch.equal(third[k], last[k]) for k in last)  # the 4th update still moves the weights


def test_embedded_default_evaluates_and_writes_samples(tmp_path):
    run_dir, results = run(tmp_path, "eval", "max_steps=1", "eval.at_start=true", "checkpoint.every=0")
    rows = [__import__("json").loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    teacher = [r for r in rows if r["source"].startswith("exact_teacher")]
    student = [r for r in rows if r["source"] == "student"]
    assert len(teacher) == 1 and len(student) == 2  # the reference row once; the student at the start and the end
    assert teacher[0]["match_rate"] >= 0.99 and teacher[0]["long_match_rate"] >= 0.99
    record = student[-1]
    assert {"step", "match_rate", "coverage", "frame_error", "long_match_rate"} <= record.keys()
    assert len(record["frame_error"]) == 6 and len(record["long_frame_error"]) == 8
    assert 0.0 <= record["match_rate"] <= 1.0
    assert (run_dir / "samples" / "step_000001.mp4").stat().st_size > 0
    # eval.prompts null (the default): the toy grids only, no validation-video folders
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        f"step_00000{s}.{ext}" for s in (0, 1) for ext in ("gif", "mp4")]
    assert results["last"]["step"] == 1


def test_killed_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    run_dir, _ = run(tmp_path, "killed", "max_steps=2")
    partial = run_dir / "checkpoints" / "step_000003.tmp"
    partial.mkdir()
    (partial / "half_written.distcp").write_bytes(b"\0" * 10)
    _, results = run(tmp_path, "killed", "max_steps=3", "resume=latest")
    assert (run_dir / "checkpoints" / "step_000003").is_dir()
    assert not partial.exists()


def test_bad_input_stops_with_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="foo"):
        compose_config("foo=1")
    with pytest.raises(Exception, match="max_steps"):
        compose_config("max_steps=many")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint|does not exist|expected"):
        run(tmp_path, "nowhere", f"resume={tmp_path / 'nowhere_at_all'}")
    with pytest.raises(Exception) as error:
        compose_config("model.attention_backend=cudnnn")  # at compose time: an enum
    assert "Invalid value 'cudnnn', expected one of [sdpa, cudnn, flash_attn, fa4, auto]" in str(error.value.__cause__)
    assert "full_key: model.attention_backend" in str(error.value.__cause__)
    with pytest.raises(ValueError, match="method.sid_alpha: Key 'sid_alpha' not in 'MethodConfig'"):
        validate(compose_config("+method.sid_alpha=2.0"))
    with pytest.raises(ValueError, match="total_batch_size=3 is not a multiple"):
        run(tmp_path, "odd", "total_batch_size=3")

    from model.dmd import DMD

    def nan_loss(self, batch):
        return torch.tensor(math.nan, requires_grad=True), {"generator_loss": math.nan}

    monkeypatch.setattr(DMD, "generator_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="generator_loss is nan at step 0"):
        run(tmp_path, "nan", "max_steps=2")
    assert not (tmp_path / "nan" / "checkpoints").exists() or not any((tmp_path / "nan" / "checkpoints").iterdir())


def test_the_default_starts_from_the_shipped_toy_initialisation():
    """The embedded default loads assets/toy strictly: ODE-initialised student, pretrained critic."""
    from safetensors.torch import load_file

    cfg = compose_config(tiny=False)
    validate(cfg)
    method = build_method(cfg, torch.device("cpu"))
    shipped = load_file(CONFIGS.parent / "assets" / "toy" / "ode_init.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in method.generator.state_dict().items())
    critic = load_file(CONFIGS.parent / "assets" / "toy" / "denoiser.safetensors")
    assert all(torch.equal(critic[k], v) for k, v in method.fake_score.state_dict().items())
    assert any(not torch.equal(shipped[k], critic[k]) for k in shipped)


def test_warm_start_runs_before_step_zero_and_changes_both_networks(tmp_path):
    """warm_start.*_steps: ODE regression of the generator and flow matching of the critic on the teacher."""
    plain, _ = run(tmp_path, "plain", "max_steps=0", "checkpoint.every=0")
    warm, _ = run(tmp_path, "warm", "max_steps=0", "checkpoint.every=0", "warm_start.generator_steps=2",
                  "warm_start.critic_steps=1")
    a = checkpoint_tensors(plain / "checkpoints" / "step_000000", tmp_path)
    b = checkpoint_tensors(warm / "checkpoints" / "step_000000", tmp_path)
    for net in (".generator.", ".critic."):
        moved = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(net))
        assert moved > 1e-4, net  # a few AdamW steps at lr 1e-3 moved the weights
