"""Train a student with any method of model/: Self Forcing (DMD, SiD), CausVid, ODE regression. Hydra entry point.

    python train.py                                   # the embedded default: DMD on the toy world
    python train.py method=sid max_steps=100          # override a knob
    python train.py -m method.guidance_scale=2,3,4    # a sweep
    python train.py hydra.run.dir=outputs/run1 resume=latest   # continue a run
    torchrun --nproc_per_node=8 train.py experiment=self_forcing_dmd   # FSDP2 over 8 GPUs

Compose (Hydra), validate (engine/config.py), build and run (engine/trainer.py), report.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from engine import config as config_schema  # registers the typed schema
from engine.trainer import train
from utils.distributed import agree_run_dir, init_distributed, log0


def report(results: dict) -> None:
    log0("outputs in %s: checkpoints/, samples/, metrics.jsonl", results["run_dir"])
    if "first" in results and "last" in results:
        first, last = results["first"], results["last"]
        log0("match rate %.3f -> %.3f, coverage %.3f -> %.3f (step %d -> %d)", first["match_rate"],
             last["match_rate"], first["coverage"], last["coverage"], first["step"], last["step"])


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config_schema.validate(cfg)
    init_distributed()  # under torchrun: rank 0's run directory is every rank's (their clocks may differ)
    run_dir = agree_run_dir(Path(HydraConfig.get().runtime.output_dir))
    report(train(cfg, run_dir))


if __name__ == "__main__":
    main()
