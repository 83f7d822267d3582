"""FSDP2 training on the toy world with 2 gloo ranks == 1 process with the same total batch; a
2-rank DCP checkpoint resumes at world size 1 and a 1-process one at 2; hybrid sharding (2 x 1 mesh); config errors.

The draws of a global batch do not depend on how it is split (noise per sample index, host choices
broadcast), so the only differences are float summation orders: the reduce-scatter's average of two
half-batch gradients against one whole-batch gradient, and sharded against whole-tensor norms.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import train
from tests.dist_setup import spawn_ranks
from tests.test_train import checkpoint_tensors
from tests.train_setup import compose_config
from engine.config import validate

# Losses and weights agree to float32 rounding compounded over 4 AdamW steps (measured: losses within
# 8e-8 relative); the bound leaves a margin for other CPUs' summation orders.
RTOL = 1e-5

COMMON = ("max_steps=4", "checkpoint.every=2", "logger.every=1", "ema_start_step=1", "eval.at_start=false")


# The self-forcing presets keep the generator and teacher gathered within a step; the critic too here.
GATHERED = tuple(f"fsdp.reshard_after_forward.{n}=false" for n in ("generator", "critic", "teacher"))


def logs(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per step, the training row of log.jsonl (rank 0 writes it; evaluation rows have no critic_loss)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "critic_loss" in r}


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per step, the logged losses."""
    return {step: {k: v for k, v in row.items() if k.endswith("_loss")} for step, row in logs(run_dir).items()}


def worker(rank, world, port, runs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for run_dir, overrides in runs:
        cfg = compose_config(*overrides)
        validate(cfg)
        train.train(cfg, Path(run_dir))
    torch.distributed.barrier()  # tear gloo down together (see _checkpoint_worker)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Batch 2 on one process; batch 1 on each of 2 ranks (FSDP, then HSDP); a resume at world size 1."""
    root = tmp_path_factory.mktemp("fsdp")
    two_rank = [(root / "fsdp2", ["batch_size=1", *COMMON]),
                (root / "hsdp2", ["batch_size=1", "fsdp.replicate=2", *COMMON]),
                (root / "gathered2", ["batch_size=1", *GATHERED, *COMMON])]
    spawn_ranks(worker, 2, two_rank)
    for name, extra in (("single", []), ("resumed", [f"resume={root / 'fsdp2' / 'checkpoints' / 'step_000002'}"])):
        cfg = compose_config("batch_size=2", *COMMON, *extra)
        validate(cfg)
        train.train(cfg, root / name)
    # and back: the one-process checkpoint (written without DCP's collectives) resumes on 2 ranks
    back = [(root / "resumed2", ["batch_size=1", *COMMON, f"resume={root / 'single' / 'checkpoints' / 'step_000002'}"])]
    spawn_ranks(worker, 2, back)
    return root


def assert_close_losses(a: dict, b: dict, steps):
    for step in steps:
        assert a[step].keys() == b[step].keys() and a[step], step
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=RTOL, abs=1e-6), (step, k, a[step][k], b[step][k])


def test_two_ranks_give_the_losses_of_one_process(runs):
    single = losses(runs / "single")
    assert sorted(single) == [1, 2, 3, 4]
    assert_close_losses(losses(runs / "fsdp2"), single, [1, 2, 3, 4])
    assert_close_losses(losses(runs / "hsdp2"), single, [1, 2, 3, 4])
    # the evaluation at the end ran under FSDP on both ranks and was written once
    rows = [json.loads(line) for line in (runs / "fsdp2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["source"] == "student"] == [4]


def test_networks_kept_gathered_train_and_checkpoint_like_resharded_ones(runs):
    """reshard_after_forward=false: a network the previous step gathered (the critic step's rollout
    gathers the generator) must still be clipped, EMA-averaged and checkpointed through its fp32 shards."""
    single, gathered = logs(runs / "single"), logs(runs / "gathered2")
    assert sorted(gathered) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # the generator updates at steps 1 and 3 (ratio 2); step 3 follows a critic-only step
        keys = ["critic_loss", "critic_grad_norm"] + (["generator_loss", "generator_grad_norm"] if step % 2 else [])
        assert ("generator_loss" in gathered[step]) == (step % 2 == 1), step
        for k in keys:
            assert gathered[step][k] > 0 and gathered[step][k] == pytest.approx(single[step][k], rel=RTOL), (step, k)
    assert sorted(p.name for p in (runs / "gathered2" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def test_two_rank_checkpoint_resumes_at_world_size_one(runs, tmp_path):
    meta = json.loads((runs / "fsdp2" / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert_close_losses(losses(runs / "resumed"), losses(runs / "fsdp2"), [3, 4])
    a = checkpoint_tensors(runs / "fsdp2" / "checkpoints" / "step_000004", tmp_path)
    b = checkpoint_tensors(runs / "resumed" / "checkpoints" / "step_000004", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith(".ema.shadow") for k in a)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=1e-6, msg=k)
    # the export is consolidated: whole tensors, shaped like the generator's
    from safetensors.torch import load_file

    export = load_file(runs / "fsdp2" / "checkpoints" / "step_000004" / "export" / "model.safetensors")
    assert export.keys() == {k.removeprefix(".generator.") for k in a if k.startswith(".generator.")}
    assert all(export[k].shape == a[f".ema.shadow.{k}"].shape for k in export)


def test_mesh_and_offload_errors():
    from utils.fsdp import mesh_shape

    assert mesh_shape(1, None, 8) == (1, 8) and mesh_shape(2, None, 8) == (2, 4) and mesh_shape(2, 4, 8) == (2, 4)
    with pytest.raises(ValueError, match="fsdp.replicate=3 must be >= 1 and divide the world size 8"):
        mesh_shape(3, None, 8)
    with pytest.raises(ValueError, match=r"fsdp.replicate x fsdp.shard = 2 x 2 = 4, but the world size is 8"):
        mesh_shape(2, 2, 8)
    with pytest.raises(ValueError, match="fsdp.replicate and fsdp.shard must be >= 1"):
        validate(compose_config("fsdp.replicate=0"))
    with pytest.raises(Exception, match="reshard_after_forward"):
        compose_config("fsdp.reshard_after_forward.vae=false")
    with pytest.raises(Exception) as error:  # an enum: refused at compose time
        compose_config("model.checkpoint_policy.critic=some")
    assert "Invalid value 'some', expected one of [full, save_attention]" in str(error.value.__cause__)
    cfg = compose_config("fsdp.cpu_offload.teacher=true", "max_steps=0")
    with pytest.raises(ValueError, match="fsdp.cpu_offload.teacher=true, but the teacher .ExactTeacher. has no parameters"):
        train.train(cfg, Path("/nonexistent-run-dir"))
    assert not torch.distributed.is_initialized()  # the one-rank group of a single process is gone again


def test_save_attention_checkpointing_gives_the_gradients_of_full_checkpointing():
    """Selective checkpointing keeps attention outputs instead of recomputing them: same gradients."""
    from model.wan.attention import CausalPattern
    from model.wan.kv_cache import KVCache
    from model.wan.transformer import WanDiT
    from tests.wan_tiny import TINY, randomize

    grads = {}
    for policy in ("full", "save_attention"):
        model = randomize(WanDiT(**TINY), 0)
        model.enable_gradient_checkpointing()
        model.checkpoint_policy = policy
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(1, 4, 4, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
        t = torch.rand(1, 4, generator=g) * 1000
        loss = model(x, t, ctx).square().mean()  # bidirectional
        cache = KVCache.for_model(model, CausalPattern(2), batch_size=1, latent_hw=(4, 4), max_frames=4)
        for start in (0, 2):  # chunks through the KV cache, with grad
            loss = loss + model(x[:, start:start + 2], t[:, start:start + 2], ctx, kv_cache=cache, frame_offset=start).mean()
        loss.backward()
        grads[policy] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["full"].items():
        torch.testing.assert_close(grads["save_attention"][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    meta = json.loads((runs / "single" / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["world_size"] == 1
    assert_close_losses(losses(runs / "resumed2"), losses(runs / "single"), [3, 4])


def _checkpoint_losses(model, rank: int):
    """A 2-chunk rollout's shape of calls on a tiny WanDiT: a grad call per chunk, a no-grad context
    pass between them (it writes the cache the second grad call attends to), through the KV cache."""
    from model.wan.attention import CausalPattern
    from model.wan.kv_cache import KVCache

    g = torch.Generator().manual_seed(10 + rank)  # each rank its own sample
    x, ctx = torch.randn(1, 4, 4, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
    t = torch.rand(1, 4, generator=g) * 1000
    cache = KVCache.for_model(model, CausalPattern(2), batch_size=1, latent_hw=(4, 4), max_frames=4)
    loss = 0.0
    for start in (0, 2):
        chunk = slice(start, start + 2)
        loss = loss + model(x[:, chunk], t[:, chunk], ctx, kv_cache=cache, frame_offset=start).square().mean()
        with torch.no_grad():  # the context pass
            model(x[:, chunk], torch.zeros_like(t[:, chunk]), ctx, kv_cache=cache, frame_offset=start)
    return loss + model(x, t, ctx).mean()  # and a bidirectional call


def _checkpoint_worker(rank, world, port, out):
    from model.wan.transformer import WanDiT, WanDiTBlock
    from tests.wan_tiny import TINY, randomize
    from utils.fsdp import shard_network

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    grad_modes, inner = [], WanDiTBlock._forward

    def recording(self, *args):
        grad_modes.append(torch.is_grad_enabled())
        return inner(self, *args)

    WanDiTBlock._forward = recording
    result = {}
    for gathered in (False, True):
        model = randomize(WanDiT(**TINY), 0)
        model.enable_gradient_checkpointing()
        model.checkpoint_policy = "full"
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        shard_network(model, mesh, param_dtype=None, reshard_after_forward=not gathered, cpu_offload=False)
        grad_modes.clear()
        loss = _checkpoint_losses(model, rank)
        forward_modes = list(grad_modes)
        loss.backward()
        result[gathered] = {
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
            "forward_modes": forward_modes, "backward_modes": grad_modes[len(forward_modes):],
        }
    if rank == 0:
        torch.save(result, out)
    torch.distributed.barrier()  # tear gloo down together: a rank leaving early can abort the other's threads
    torch.distributed.destroy_process_group()


def test_full_checkpointing_inside_fsdp_units_gives_the_gradients_of_no_checkpointing(tmp_path):
    """Full checkpointing runs each block's forward without grad and recomputes it in the backward,
    inside the block's FSDP unit: on 2 gloo ranks, resharded after forward or kept gathered, the
    gradients equal an unsharded, uncheckpointed model's averaged over the two ranks' samples."""
    from model.wan.transformer import WanDiT
    from tests.wan_tiny import TINY, randomize

    spawn_ranks(_checkpoint_worker, 2, str(tmp_path / "grads.pt"))
    result = torch.load(tmp_path / "grads.pt")
    reference = randomize(WanDiT(**TINY), 0)
    sum(_checkpoint_losses(reference, rank) for rank in (0, 1)).backward()
    layers = TINY["num_layers"]
    for gathered, r in result.items():
        # per block: 2 grad calls run without grad (the checkpoint's forward), 2 context passes, 1 bidirectional call
        assert r["forward_modes"] == [False] * layers * 5, (gathered, r["forward_modes"])
        assert r["backward_modes"] == [True] * layers * 3, (gathered, r["backward_modes"])  # the recomputes
        for n, p in reference.named_parameters():
            torch.testing.assert_close(r["grads"][n], p.grad / 2, rtol=1e-5, atol=1e-7, msg=f"{n} (gathered={gathered})")


def test_a_cache_reset_before_the_backward_of_a_checkpointed_chunk_call_is_an_error():
    """The checkpointed chunk call keeps views of the cache for its recompute: a reset() in between
    (a new rollout on the same cache) would feed it other keys, so the backward refuses."""
    from model.wan.attention import CausalPattern
    from model.wan.kv_cache import KVCache
    from model.wan.transformer import WanDiT
    from tests.wan_tiny import TINY, randomize

    model = randomize(WanDiT(**TINY), 0)
    model.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(1, 2, 4, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g), torch.full((1, 2), 500.0)
    cache = KVCache.for_model(model, CausalPattern(2), batch_size=1, latent_hw=(4, 4), max_frames=4)
    loss = model(x, t, ctx, kv_cache=cache).square().mean()
    cache.reset()
    with pytest.raises(RuntimeError, match="KV cache was reset between a checkpointed chunk call and its backward"):
        loss.backward()
