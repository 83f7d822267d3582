"""Time generator steps and critic steps of a training config through the trainer's FSDP2 wrapping.

  torchrun --nproc_per_node=NUM_GPUS scripts/bench_train.py experiment=self_forcing_dmd \
      model.path=/tmp/wan-1.3b-random data.prompts.path=/tmp/prompts.txt --steps 4

(`python scripts/bench_train.py ...` is world size 1 of the same code; methods that read real clips,
such as experiment=dmd2_gan or fdistill_js, take `--random-latents 8` for random clips of the run's
latent shape in place of encoded videos.) The networks are built and
sharded exactly as the trainer does (build_method on the fsdp.* mesh); each step is the
trainer's own `run_phase` (rollout or sampling, loss, backward, clip, AdamW) on its own batch of
`batch_size` prompts per rank. The first `--warmup` steps of each kind are warm-up (kernels,
compilation); the rest are timed with device synchronisation. Printed on rank 0, as JSON: median step
times per kind, every step's time and exit step, peak memory per GPU, and tokens/s (latent tokens of
the training clips, num_training_frames x tokens per frame, of the global batch, per second of that
step kind).

A step's cost depends on its exit step (exit step k runs k + 1 generator calls per chunk), which the
rollout draws at random. `--exit-steps 0,1,2,3` makes the steps take these in turn instead (warm-up
runs each once, so every shape is compiled before timing) and adds the mean over one cycle, the
expected step time under the uniform draw, to the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.build import build_method, build_optimizer  # noqa: E402
from engine.config import compose_checked  # noqa: E402
from engine.config import optim_config  # noqa: E402
from engine.trainer import DataSources, Optimized, run_phase  # noqa: E402
from utils.data import write_shard  # noqa: E402
from utils.distributed import all_gather_object, destroy, init_distributed, pick_device, single_process_group  # noqa: E402
from utils.fsdp import build_mesh, mesh_shape  # noqa: E402
from utils.rng import seed_everything  # noqa: E402


def clip_tokens(cfg, method) -> int:
    """Latent tokens of one training clip: frames x (H / patch) x (W / patch)."""
    _, p_h, p_w = method.generator.config.patch_size
    _, height, width = method.latent_shape
    return cfg.method.num_training_frames * (height // p_h) * (width // p_w)


def force_exit_steps(method, schedule: list[int]):
    """Make plan_rollout return schedule[i % len] as every chunk's exit step on its i-th call."""
    plan, calls = method.plan_rollout, [0]

    def planned():
        num_frames, exits = plan()  # the same host draws as without forcing: the rest of the run is unchanged
        exit_step = schedule[calls[0] % len(schedule)]
        return num_frames, [exit_step] * len(exits)

    def set_call(i: int) -> None:
        calls[0] = i

    method.plan_rollout = planned
    return set_call


def write_random_latents(cfg, num: int, folder: Path) -> Path:
    """`num` standard-normal clips [F, C, H, W] (the run's num_training_frames and model.latent_shape) as one
    latent shard (utils/data.py), with placeholder captions; the same on every rank (seeded)."""
    if cfg.data.get("videos") is None or cfg.data.videos.get("_target_") != "utils.data.LatentShards":
        raise SystemExit("--random-latents fills data.videos of data=latents: add data=latents to the overrides")
    shape = (num, cfg.method.num_training_frames, *cfg.model.latent_shape)
    clips = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    write_shard(folder, 0, "latents", clips, [f"random clip {i}" for i in range(num)])
    return folder


def build_sharded(cfg, dist):
    """(device, method, data): the networks built and sharded as the trainer does, and its data sources."""
    device = pick_device(cfg, dist.local_rank)
    seed_everything(cfg.seed, 0)  # random weights (model.path folders hold fixed ones): the same on every rank
    method = build_method(cfg, device, build_mesh(cfg.fsdp, dist))
    return device, method, DataSources(cfg.data, cfg.batch_size, dist.world_size, 1)


def bench(cfg, dist, steps: int, warmup: int = 1, exit_schedule: list[int] | None = None, built=None) -> dict:
    """built: build_sharded's (device, method, data), for a caller that goes on using the method (bench_image.py)."""
    device, method, data = built or build_sharded(cfg, dist)
    cuda = device.type == "cuda"
    global_tokens = clip_tokens(cfg, method) * cfg.batch_size * dist.world_size
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "world_size": dist.world_size,
        "mesh": list(mesh_shape(cfg.fsdp.replicate, cfg.fsdp.shard, dist.world_size)),
        "overrides": None,
        "weights_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None,
        "tokens_per_clip": clip_tokens(cfg, method),
    }
    set_call = force_exit_steps(method, exit_schedule) if exit_schedule else None
    if exit_schedule:
        warmup = max(warmup, len(exit_schedule))
    networks = type(method).networks
    for phase_spec in type(method).phases:
        phase = phase_spec.name
        # fresh optimizers per phase: the previous phase's AdamW state is freed, so the peak is one
        # network's optimizer state, as this benchmark has always measured (training holds both)
        optimized = {name: Optimized(getattr(method, spec.attr),
                                     *build_optimizer(getattr(method, spec.attr).parameters(), optim_config(cfg, name),
                                                      warmup + steps), optim_config(cfg, name))
                     for name, spec in networks.items() if spec.trained}
        times, exits = [], []
        for step in range(warmup + steps):
            ids, _ = data.get(phase_spec.data, step, 0, dist.rank)
            if set_call:  # warm-up steps run every exit step once; timed steps cycle from the first
                set_call(step if step < warmup else step - warmup)
            method.reseed(cfg.seed, step, phase, ids)  # the draws run_phase will make (it reseeds the same way)
            exits.append(method.plan_rollout()[1][0])
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            logs = run_phase(method, phase_spec, optimized, data, step, cfg.seed, dist, 1)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if dist.is_main:
                print(phase, step, "warm-up" if step < warmup else "timed", f"exit step {exits[-1]}",
                      f"{times[-1]:.2f} s", {k: round(v, 4) for k, v in logs.items()}, flush=True)
        timed, timed_exits = times[warmup:], exits[warmup:]
        median = statistics.median(timed)
        result[f"{phase}_step_s"] = median
        result[f"{phase}_step_all_s"] = [round(t, 3) for t in times]
        result[f"{phase}_exit_steps"] = exits
        if exit_schedule:
            per_exit = {k: statistics.median([t for t, e in zip(timed, timed_exits) if e == k])
                        for k in sorted(set(exit_schedule)) if k in timed_exits}
            result[f"{phase}_step_s_per_exit_step"] = {str(k): round(v, 3) for k, v in per_exit.items()}
            if len(per_exit) == len(set(exit_schedule)):
                result[f"{phase}_step_s_mean_over_exit_steps"] = round(
                    sum(per_exit[k] for k in exit_schedule) / len(exit_schedule), 3)
        result[f"{phase}_tokens_per_s"] = global_tokens / median
        result[f"{phase}_tokens_per_s_per_gpu"] = global_tokens / median / dist.world_size
    if cuda:
        peaks = all_gather_object((torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30))
        result["peak_allocated_gib_per_gpu"] = [round(a, 2) for a, _ in peaks]
        result["peak_reserved_gib_per_gpu"] = [round(r, 2) for _, r in peaks]
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first (at least one per --exit-steps entry)")
    p.add_argument("--exit-steps", default=None,
                   help="comma-separated exit step indices the steps take in turn (e.g. 0,1,2,3); default: drawn as in training")
    p.add_argument("--out", default=None, help="also write the JSON result here (rank 0)")
    p.add_argument("--random-latents", type=int, default=0, metavar="N",
                   help="with data=latents: N random clips of the run's latent shape in a temporary folder, for "
                        "methods that read real clips (dmd2_gan, fdistill_js, causvid) without encoded videos")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    exit_schedule = [int(k) for k in args.exit_steps.split(",")] if args.exit_steps else None
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = compose_checked(["total_batch_size=null", *args.overrides])
    if args.random_latents:  # data=latents without encoded videos: random clips of the run's latent geometry
        folder = write_random_latents(cfg, args.random_latents, Path(tempfile.mkdtemp(prefix="bench_latents_")))
        cfg = compose_checked(["total_batch_size=null", *args.overrides, f"data.videos.path={folder}"])
    dist = init_distributed()
    single_process_group(dist)
    try:
        num_steps = len(cfg.method.denoising_step_list)
        if exit_schedule and not all(0 <= k < num_steps for k in exit_schedule):
            raise SystemExit(f"--exit-steps must be indices into method.denoising_step_list (0..{num_steps - 1}), got {args.exit_steps}")
        result = bench(cfg, dist, args.steps, args.warmup, exit_schedule)
    finally:
        destroy()
    result["overrides"] = args.overrides
    if dist.is_main:
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
