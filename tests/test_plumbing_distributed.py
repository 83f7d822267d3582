"""Two gloo ranks on CPU: collectives, DCP checkpoints of a replicated and of an FSDP2
(`fully_shard`) model that load in one process; world size 1 without torchrun; the tracker."""

import json
import os
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from tests.dist_setup import spawn_ranks
from utils import distributed as D
from utils.checkpoint import CheckpointManager
from utils.ema import EMA
from utils.tracker import NullTracker, ProgressBar, make_tracker

WORLD = 2
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def make_model(device="cpu", seed=0):
    torch.manual_seed(seed)  # same seed on every rank = same initial weights, as a broadcast would give
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model, optim, ema, rank, steps):
    device = next(model.parameters()).device
    for step in range(steps):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * rank + step)).to(device)
        model(x).square().mean().backward()
        optim.step()
        optim.zero_grad()
        ema.update(model, step)


def full(t):
    t = t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t.detach().clone()
    return t.cpu()


def worker(rank, world, port, out, device_type):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = D.init_distributed(device_type)
    assert D.init_distributed(device_type) == d  # idempotent
    results = {
        "dist": (d.rank, d.world_size, str(d.device)),
        "broadcast": D.broadcast_object({"from": rank, "list": [rank] * 3}),
        "mean": D.all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank], device=d.device)).tolist(),
        "is_main": D.is_main(),
    }

    # Replicated (DDP-like) model: DCP writes one copy of each tensor.
    model = make_model(d.device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.5)
    train(model, optim, ema, rank=0, steps=2)  # same data on every rank keeps them replicated
    CheckpointManager(out / "replicated", keep=1).save(2, {"model": model, "ema": ema, "ranked": {"rank": rank}})
    results["replicated"] = {k: full(v) for k, v in model.state_dict().items()}

    # FSDP2: each Linear and the root sharded over the mesh; each rank trains on its own data.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world,))
    model = shard(make_model(d.device), mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.5)
    train(model, optim, ema, rank, steps=3)
    results["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    export = {"weights": ema.full_state_dict(dtype=torch.bfloat16), "config": {"dim": 7}}
    state = {"model": model, "optim": optim, "ema": ema, "ranked": {"rank": rank}}
    CheckpointManager(out / "fsdp", keep=1).save(3, state, export=export)
    results["fsdp"] = {
        "model": {k: full(v) for k, v in model.state_dict().items()},
        "exp_avg": {k: full(v["exp_avg"]) for k, v in optim.state_dict()["state"].items()},
        "ema": {k: v.cpu() for k, v in ema.full_state_dict().items()},
    }

    # Resume at the same world size into fresh, differently initialised sharded objects.
    fresh = shard(make_model(d.device, seed=1 + rank), mesh)
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_ema, ranked = EMA(fresh, decay=0.5), {}
    fresh_state = {"model": fresh, "optim": fresh_optim, "ema": fresh_ema, "ranked": ranked}
    step = CheckpointManager(out / "fsdp", keep=1).load(out / "fsdp", fresh_state)
    results["resumed"] = {
        "step": step,
        "ranked": ranked,
        "model": {k: full(v) for k, v in fresh.state_dict().items()},
        "ema": {k: v.cpu() for k, v in fresh_ema.full_state_dict().items()},
        "ema_step": fresh_ema.step,
    }
    torch.save(results, out / f"results_{rank}.pt")
    D.barrier()  # tear gloo down together: a rank leaving early can abort the other's gloo threads (seen on CI)
    D.destroy()


def spawn(out, world, device_type):
    spawn_ranks(worker, world, out, device_type)
    return out, [torch.load(out / f"results_{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("dist"), WORLD, "cpu")


def assert_equal_dicts(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def check_collectives(results, device):
    world = len(results)
    for rank, res in enumerate(results):
        assert res["dist"] == (rank, world, device.format(rank=rank))
        assert res["broadcast"] == {"from": 0, "list": [0, 0, 0]}
        # mean of rank + 1 and of 10 * rank over the ranks
        assert res["mean"] == [(world + 1) / 2, 5.0 * (world - 1)]
        assert res["is_main"] == (rank == 0)


def check_replicated(out, results):
    model, ranked = make_model(), {}
    ema = EMA(model, decay=0.5)
    state = {"model": model, "ema": ema, "ranked": ranked}
    step = CheckpointManager(out / "replicated", keep=1).load(out / "replicated", state)
    assert step == 2 and ranked == {"rank": 0}
    assert_equal_dicts(model.state_dict(), results[0]["replicated"])
    assert ema.active and ema.step == 1


def check_fsdp(out, results):
    saved = results[0]["fsdp"]
    total = sum(p.numel() for p in make_model().parameters())
    assert sum(res["local_numel"] for res in results) == total  # shards partition the model
    # Same world size: every rank gets the sharded state back and its own per-rank dict.
    for rank, res in enumerate(results):
        resumed = res["resumed"]
        assert resumed["step"] == 3 and resumed["ranked"] == {"rank": rank} and resumed["ema_step"] == 2
        assert_equal_dicts(resumed["model"], saved["model"])
        assert_equal_dicts(resumed["ema"], saved["ema"])

    # World size 1: plain CPU model, optimiser and EMA, no process group.
    model = make_model(seed=5)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.5)
    state = {"model": model, "optim": optim, "ema": ema}
    assert CheckpointManager(out / "fsdp", keep=1).load(out / "fsdp", state) == 3
    assert_equal_dicts(model.state_dict(), saved["model"])
    assert_equal_dicts({k: v["exp_avg"] for k, v in optim.state_dict()["state"].items()}, saved["exp_avg"])
    assert_equal_dicts(ema.shadow, saved["ema"])

    export = out / "fsdp" / "checkpoints" / "step_000003" / "export"
    weights = load_file(str(export / "model.safetensors"))
    assert_equal_dicts(weights, {k: v.to(torch.bfloat16) for k, v in saved["ema"].items()})
    assert json.loads((export / "config.json").read_text()) == {"dim": 7}


def test_collectives(two_ranks):
    check_collectives(two_ranks[1], "cpu")


def test_replicated_checkpoint_loads_in_one_process(two_ranks):
    check_replicated(*two_ranks)


def test_fsdp2_checkpoint_reshards(two_ranks):
    out, results = two_ranks
    assert all(res["local_numel"] < sum(p.numel() for p in make_model().parameters()) for res in results)
    check_fsdp(out, results)


@pytest.mark.gpu
def test_nccl_fsdp2_on_gpus(tmp_path):
    """The same checks with NCCL and CUDA tensors, one rank per visible GPU."""
    out, results = spawn(tmp_path, torch.cuda.device_count(), "cuda")
    check_collectives(results, "cuda:{rank}")
    check_replicated(out, results)
    check_fsdp(out, results)


def test_world_size_one_without_torchrun(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    d = D.init_distributed("cpu")
    assert (d.rank, d.world_size, d.local_rank, d.device.type) == (0, 1, 0, "cpu") and d.is_main
    assert not torch.distributed.is_initialized()
    assert D.broadcast_object([1, 2]) == [1, 2]
    t = torch.tensor([3.0])
    assert D.all_reduce_mean(t) is t and t.item() == 3.0
    D.barrier()
    assert D.is_main() and D.all_gather_object("x") == ["x"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="partial torchrun environment"):
        D.init_distributed("cpu")


FAKE_WANDB = """
calls = []
class Video:
    def __init__(self, path): self.path = path
class Run:
    def log(self, data, step): calls.append(("log", data, step))
    def finish(self): calls.append(("finish",))
def init(**kwargs):
    calls.append(("init", kwargs))
    return Run()
"""


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """A stand-in `wandb` on sys.path: importable, so the tests see whether the tracker imports it."""
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    yield
    sys.modules.pop("wandb", None)


def test_disabled_tracker_never_imports_wandb(tmp_path, fake_wandb):
    tracker = make_tracker("disabled", "proj", "run", tmp_path, {"lr": 1e-3}, rank=0)
    tracker.log({"loss": torch.tensor(0.5)}, step=3)
    tracker.log_video(tmp_path / "a.mp4", "sample", step=4)
    tracker.finish()
    assert "wandb" not in sys.modules
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "loss": 0.5}, {"step": 4, "sample": str(tmp_path / "a.mp4")}]
    assert isinstance(make_tracker("offline", "proj", "run", tmp_path / "r1", {}, rank=1), NullTracker)
    assert "wandb" not in sys.modules and not (tmp_path / "r1").exists()


def test_offline_tracker_logs_to_wandb(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="needs WANDB_API_KEY"):
        make_tracker("online", "proj", "run", tmp_path, {}, rank=0)
    tracker = make_tracker("offline", "proj", "run", tmp_path, {"lr": 1e-3}, rank=0)
    tracker.log({"loss": 0.25}, step=2)
    tracker.log_video("v.mp4", "sample", step=2)
    tracker.finish()
    calls = sys.modules["wandb"].calls
    assert calls[0] == ("init", {"project": "proj", "name": "run", "dir": str(tmp_path), "config": {"lr": 1e-3}, "mode": "offline"})
    assert calls[1] == ("log", {"loss": 0.25}, 2)
    assert calls[2][0] == "log" and calls[2][1]["sample"].path == "v.mp4" and calls[2][2] == 2
    assert calls[3] == ("finish",)


def test_tracker_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(RuntimeError, match="pip install wandb or set logger.mode=disabled"):
        make_tracker("offline", "proj", "run", tmp_path, {}, rank=0)
    for rank in (0, 1):
        with pytest.raises(ValueError, match=r"'logger\.wandb_api_key' looks like an API key"):
            make_tracker("disabled", "p", "r", tmp_path, {"logger": {"wandb_api_key": "x"}}, rank=rank)
    from omegaconf import OmegaConf

    nested = OmegaConf.create({"runs": [{"name": "a"}, {"WANDB-KEY": "x"}]})
    with pytest.raises(ValueError, match=r"'runs\[1\]\.WANDB-KEY'"):
        make_tracker("disabled", "p", "r", tmp_path, nested, rank=0)
    with pytest.raises(ValueError, match="logger.mode must be one of"):
        make_tracker("on", "p", "r", tmp_path, {}, rank=0)


def test_progress_bar():
    bar = ProgressBar(total=10, initial=2)
    bar.update(5, {"loss": torch.tensor(0.123456)})
    assert bar.bar.n == 5 and bar.bar.postfix == "loss=0.1235"
    bar.close()
    silent = ProgressBar(total=10, disable=True)
    silent.update(3, {"loss": 1.0})
    assert silent.bar.disable
