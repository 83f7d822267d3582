"""Experiment tracking (rank 0 only) and the training progress bar.

Rank 0 always appends metrics and video paths to `<run_dir>/log.jsonl`, so a run without
wandb (the default toy run, CI) still leaves a machine-readable record; wandb is imported only
when asked for. Other ranks get a tracker that does nothing (nanochat's DummyWandb), so the loop
calls the same methods everywhere.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils.distributed import is_main

MODES = ("online", "offline", "disabled")
# Secrets come from the environment only: a key in the config would be saved with every checkpoint.
_SECRET_KEY = re.compile(r"api[_-]?key|wandb[_-]?key", re.IGNORECASE)


def check_no_secrets(config: Any, path: str = "") -> None:
    """Raise on any key that looks like a secret (Mapping, so an OmegaConf DictConfig is covered too)."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if _SECRET_KEY.search(str(key)):
                raise ValueError(
                    f"config key {where!r} looks like an API key; secrets are read from the environment "
                    "only (export WANDB_API_KEY=...), remove it from the config"
                )
            check_no_secrets(value, where)
    elif isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        for i, value in enumerate(config):
            check_no_secrets(value, f"{path}[{i}]")


class NullTracker:
    """What non-zero ranks get: same methods, no effect."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_video(self, path: str | Path, key: str, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    def __init__(self, run_dir: str | Path, wandb_run: Any = None):
        self.wandb_run = wandb_run
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(run_dir) / "log.jsonl", "a")
        self.videos: list[tuple[int, str, str]] = []  # (step, key, path), also in log.jsonl

    def _record(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self._record({"step": step, **metrics})
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_video(self, path: str | Path, key: str, step: int) -> None:
        self.videos.append((step, key, str(path)))
        self._record({"step": step, key: str(path)})
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Video(str(path))}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        self._file.close()


def make_tracker(
    mode: str, project: str, name: str | None, run_dir: str | Path, config: dict, rank: int
) -> NullTracker:
    if mode not in MODES:
        raise ValueError(f"logger.mode must be one of {MODES}, got {mode!r}")
    check_no_secrets(config)
    if rank != 0:
        return NullTracker()
    if mode == "disabled":
        return Tracker(run_dir)
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(f"logger.mode={mode} needs wandb: pip install wandb or set logger.mode=disabled") from e
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        # Without it wandb would prompt for a key, which hangs a non-interactive job.
        raise RuntimeError(
            "logger.mode=online needs WANDB_API_KEY in the environment; "
            "export it, or set logger.mode=offline or logger.mode=disabled"
        )
    run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode)
    return Tracker(run_dir, run)


class ProgressBar:
    """tqdm over optimiser steps with the latest losses; silent on non-zero ranks."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False):
        self.bar = tqdm(total=total, initial=initial, disable=disable or not is_main(), unit="it", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        """`step` is the number of finished steps; the bar advances to it (so it/s counts steps)."""
        if metrics:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
