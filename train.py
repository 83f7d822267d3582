"""Train a student with any method of model/: Self Forcing (DMD, SiD), CausVid, ODE regression. Hydra entry point.

    python train.py                                   # the embedded default: DMD on the toy world
    python train.py method=sid max_steps=100          # override a knob
    python train.py -m method.guidance_scale=2,3,4    # a sweep
    python train.py hydra.run.dir=outputs/run1 resume=latest   # continue a run
    torchrun --nproc_per_node=8 train.py experiment=self_forcing_dmd   # FSDP2 over 8 GPUs

Compose (Hydra), validate (engine/config.py), build and run (engine/trainer.py), report. Expected
errors end in one line (utils/errors.py; debug=true for the traceback).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from engine import config as config_schema  # registers the typed schema
from engine.trainer import train
from utils.distributed import agree_run_dir, init_distributed, log0
from utils.errors import one_line_errors

OUTPUTS = ("checkpoints", "samples", "metrics.jsonl", "log.jsonl")


def report(results: dict) -> None:
    run_dir = Path(results["run_dir"])
    written = [name + ("/" if (run_dir / name).is_dir() else "") for name in OUTPUTS if (run_dir / name).exists()]
    log0("outputs in %s: %s", run_dir, ", ".join(written) or "nothing")
    if "first" in results and "last" in results:
        first, last = results["first"], results["last"]
        log0("match rate %.3f -> %.3f, coverage %.3f -> %.3f (step %d -> %d)", first["match_rate"],
             last["match_rate"], first["coverage"], last["coverage"], first["step"], last["step"])


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    own_dir = Path(HydraConfig.get().runtime.output_dir)
    with one_line_errors(own_dir, debug=cfg.debug):
        config_schema.validate(cfg)
        init_distributed()  # under torchrun: rank 0's run directory is every rank's (their clocks may differ)
        run_dir = agree_run_dir(own_dir)
        report(train(cfg, run_dir))


if __name__ == "__main__":
    main()
