"""Time one generator step and one critic step of a training config on one GPU, with peak memory.

  python scripts/bench_train.py experiment=self_forcing_dmd model.path=/tmp/wan-1.3b-random \
      data.prompts.path=/tmp/prompts.txt --steps 2

Each step is the trainer's own `step_update` (rollout or sampling, loss, backward, clip, AdamW);
the first step of each kind is warm-up, the rest are timed with device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import train  # noqa: E402
from utils.build import Batches, build_method, build_optimizer, pick_device  # noqa: E402
from utils.config import validate  # noqa: E402
from utils.distributed import init_distributed  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps of each kind, the first one warm-up")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["total_batch_size=null", *args.overrides])
    validate(cfg)
    dist = init_distributed()
    device = pick_device(cfg, dist.local_rank)
    method = build_method(cfg, device)
    batches = Batches(instantiate(cfg.data.prompts), cfg.batch_size, dist.world_size, 1)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world_size": dist.world_size,
              "weights_gib": torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None}
    for phase, net, optim_cfg in (("generator", method.generator, cfg.generator_optim),
                                  ("critic", method.fake_score, cfg.critic_optim)):
        opt, sched = build_optimizer(net.parameters(), optim_cfg, args.steps)
        times = []
        for step in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logs = train.step_update(method, phase, net, opt, sched, batches, step, cfg, dist, 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            print(phase, step, f"{times[-1]:.2f} s", {k: round(v, 4) for k, v in logs.items()}, flush=True)
        result[f"{phase}_step_s"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
        result[f"{phase}_step_all_s"] = times
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
