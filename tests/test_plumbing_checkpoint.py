"""Checkpoint manager in one process: round trip, bit-exact resume, interrupted saves, retention,
resume-path errors, refusal of non-finite weights, and the consolidated export."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import utils.checkpoint as ckpt
from utils.checkpoint import CheckpointManager
from utils.checkpoint_dirs import find_checkpoint, latest, resolve_resume
from utils.ema import EMA
from utils.rng import get_rng_state, seed_everything, set_rng_state, step_generator

SEED = 7


class DataPosition:
    """Stands in for the data loader's position (a Stateful without tensors)."""

    def __init__(self):
        self.index = 0

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class Run:
    """Everything a training run holds, built fresh; `init_seed` decides the initial weights."""

    def __init__(self, init_seed=0):
        torch.manual_seed(init_seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        # Warm-up schedule: resume must restore the scheduler's position too.
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lambda s: min(1.0, (s + 1) / 4))
        self.ema = EMA(self.model, decay=0.9, start_step=1)
        self.data = DataPosition()
        self.extra = {"note": "hello"}

    def state(self):
        return {
            "model": self.model,
            "optim": self.optim,
            "sched": self.sched,
            "ema": self.ema,
            "data": self.data,
            "rng": get_rng_state(),
            "extra": self.extra,
        }

    def train(self, start, stop):
        for step in range(start, stop):
            # Per-step noise from (seed, rank, step), and global-RNG noise (as dropout would use)
            # so that resume is exact only if the global RNG state was restored too.
            x = torch.randn(16, 4, generator=step_generator(SEED, 0, step))
            x = x + 0.1 * torch.randn_like(x)
            loss = self.model(x).square().mean()
            loss.backward()
            self.optim.step()
            self.optim.zero_grad()
            self.sched.step()
            self.ema.update(self.model, step)
            self.data.index += 16


def snapshot(run):
    return copy.deepcopy(
        {
            "model": run.model.state_dict(),
            "optim": run.optim.state_dict(),
            "sched": run.sched.state_dict(),
            "ema": run.ema.state_dict(),
            "data": run.data.index,
            "extra": run.extra,
            "draw": torch.rand(3),  # what the global RNG gives next
        }
    )


def assert_same(a, b):
    """Recursive equality with torch.equal on tensors."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_restores_every_tensor(tmp_path):
    seed_everything(SEED, 0)
    run = Run()
    run.train(0, 3)
    state = run.state()
    rng = get_rng_state()
    expected = snapshot(run)  # consumes one global draw; rewind so the saved RNG is what it saw
    set_rng_state(rng)
    state["rng"] = rng
    CheckpointManager(tmp_path, keep=0).save(3, state)

    run.train(3, 5)  # mutate everything
    run.extra["note"] = "changed"
    torch.rand(10)
    assert not torch.equal(run.model[0].weight, expected["model"]["0.weight"])

    loaded = run.state()
    step = CheckpointManager(tmp_path, keep=0).load(tmp_path, loaded)
    set_rng_state(loaded["rng"])
    assert step == 3
    assert_same(snapshot(run), expected)
    assert run.ema.step == 2 and run.ema.active


def test_resume_is_bit_exact(tmp_path):
    seed_everything(SEED, 0)
    straight = Run()
    straight.train(0, 6)

    seed_everything(SEED, 0)
    first = Run()
    first.train(0, 3)
    CheckpointManager(tmp_path, keep=1).save(3, first.state())

    seed_everything(123, 0)  # a resumed process starts from a different global RNG ...
    resumed = Run(init_seed=1)  # ... and different initial weights
    state = resumed.state()
    step = CheckpointManager(tmp_path, keep=1).load(resolve_resume("latest", tmp_path), state)
    set_rng_state(state["rng"])
    resumed.train(step, 6)

    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    assert_same(resumed.optim.state_dict(), straight.optim.state_dict())
    assert_same(resumed.ema.state_dict(), straight.ema.state_dict())
    assert resumed.sched.state_dict() == straight.sched.state_dict()
    assert resumed.data.index == straight.data.index == 96


def test_interrupted_save_leaves_previous_latest(tmp_path, monkeypatch):
    seed_everything(SEED, 0)
    run = Run()
    manager = CheckpointManager(tmp_path, keep=0)
    manager.save(5, run.state())
    run.train(0, 2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the export")

    # DCP shards and the rank file are already in step_000010.tmp when this fires.
    monkeypatch.setattr(CheckpointManager, "_write_export", staticmethod(killed))
    with pytest.raises(KeyboardInterrupt):
        manager.save(10, run.state(), export={"weights": {"w": torch.ones(2)}, "config": {}})
    leftover = tmp_path / "checkpoints" / "step_000010.tmp"
    assert any(leftover.iterdir())
    # A half-written directory with a later step and even a meta.json is never picked.
    fake = tmp_path / "checkpoints" / "step_000020.tmp"
    fake.mkdir()
    (fake / "meta.json").write_text(json.dumps({"step": 20}))
    assert latest(tmp_path).name == "step_000005"
    assert find_checkpoint(tmp_path).name == "step_000005"
    assert manager.load(tmp_path, Run().state()) == 5

    monkeypatch.undo()
    manager.save(10, run.state())
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000005", "step_000010"]
    assert latest(tmp_path).name == "step_000010"


def test_keep_and_resume_paths(tmp_path):
    run = Run()
    manager = CheckpointManager(tmp_path, keep=2)
    assert resolve_resume("latest", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    for step in (1, 2, 3):
        manager.save(step, run.state())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    newest = tmp_path / "checkpoints" / "step_000003"
    assert latest(tmp_path) == newest
    assert resolve_resume(tmp_path, "unused") == newest
    assert resolve_resume(tmp_path / "checkpoints", "unused") == newest
    assert resolve_resume(tmp_path / "checkpoints" / "step_000002", "unused").name == "step_000002"

    with pytest.raises(FileNotFoundError, match="does not exist; expected a step directory"):
        resolve_resume(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        resolve_resume(tmp_path / "empty", tmp_path)
    with pytest.raises(KeyError, match=r"no modules \['critic'\]"):
        manager.load(tmp_path, {"critic": nn.Linear(4, 8)})

    keep_all = CheckpointManager(tmp_path / "all", keep=0)
    for step in (1, 2, 3):
        keep_all.save(step, run.state())
    assert len(ckpt.complete_checkpoints(tmp_path / "all")) == 3


def test_bad_state_is_refused_before_writing(tmp_path):
    run = Run()
    manager = CheckpointManager(tmp_path, keep=0)
    with torch.no_grad():
        run.model[2].bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.2\.bias holds NaN or Inf"):
        manager.save(1, run.state())
    assert not (tmp_path / "checkpoints").exists()

    with torch.no_grad():
        run.model[2].bias[1] = 0.0
    with pytest.raises(TypeError, match="weights_only"):
        manager.save(1, {"model": run.model, "meta": {"obj": DataPosition()}})
    assert not (tmp_path / "checkpoints").exists()
    bad_export = {"weights": {"a": torch.tensor([1.0, float("inf")])}, "config": {}}
    with pytest.raises(FloatingPointError, match=r"export\.a holds NaN or Inf"):
        manager.save(1, run.state(), export=bad_export)
    assert not (tmp_path / "checkpoints").exists()


def test_export_round_trip(tmp_path):
    weights = {
        "blocks.0.weight": torch.randn(3, 4).to(torch.bfloat16),
        "blocks.0.bias": torch.randn(8)[::2],  # non-contiguous on purpose
        "head.weight": torch.randn(2, 3),
    }
    config = {"dim": 4, "num_layers": 1, "patch_size": [1, 2, 2]}
    path = CheckpointManager(tmp_path, keep=0).save(4, {"model": Run().model}, export={"weights": weights, "config": config})
    loaded = load_file(str(path / "export" / "model.safetensors"))
    assert loaded.keys() == weights.keys()
    for k, v in weights.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert json.loads((path / "export" / "config.json").read_text()) == config
