"""Evaluate students against their teacher on the same prompts and seeds: side-by-side videos, scores
(metrics.json) and a page to watch them (index.html). Hydra entry point; README: Evaluate.

    python evaluate.py checkpoints=outputs/2025-01-01/12-00-00                       # the toy world, its prompts
    python evaluate.py checkpoints=[<run a>,<run b>] names=[dmd,sid] prompts=prompts.txt seed=[0,1] \
        clip.weights=<open-clip folder> teacher.steps=50
    python evaluate.py checkpoints=<run> prompts=prompts.txt num_frames=42             # past the training length
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from engine.evaluate import run
from engine.student import group_overrides
from utils.errors import one_line_errors


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    # expected errors (a bad checkpoint, prompt file or key) end in one line; HYDRA_FULL_ERROR=1 for the traceback
    with one_line_errors(Path(hydra_cfg.runtime.output_dir), hint="HYDRA_FULL_ERROR=1"):
        run(cfg, cfg.output_dir or hydra_cfg.runtime.output_dir, group_overrides(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
