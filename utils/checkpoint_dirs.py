"""Checkpoints on disk: where a run's steps are, which are complete, and what is wrong with a damaged one.

A step directory `<run_dir>/checkpoints/step_XXXXXX/` is complete once it has lost its `.tmp` suffix; its
`meta.json` records every file's size, so `damage` names a truncated or missing file before DCP reads it.
`find_checkpoint` and `resolve_resume` turn what a user passes (a run or a step directory, `latest`) into
one complete step, or one line saying what is wrong and which earlier step is intact. Writing and loading
them is utils/checkpoint.py's CheckpointManager.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch.distributed.checkpoint as dcp

from utils.distributed import log0

CHECKPOINTS = "checkpoints"
META = "meta.json"
DCP_INDEX = ".metadata"  # DCP's index: tensor shapes and where their bytes are
EXPORT_ADAPTER, EXPORT_ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's file names
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ANY_STEP = re.compile(r"^step_(\d+)(\.tmp)?$")  # complete or interrupted
_WHERE = "a step directory (<run_dir>/checkpoints/step_XXXXXX) or a run directory holding checkpoints/"


class DamagedCheckpoint(ValueError):
    """A checkpoint with a missing, truncated or unreadable file; the message names it and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under run_dir, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    matches = ((_STEP_DIR.match(p.name), p) for p in root.iterdir())
    return sorted((int(m.group(1)), p) for m, p in matches if m and (p / META).is_file())


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step directory under checkpoints/, interrupted (.tmp) ones included,
    oldest first (at one step, the .tmp first)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), m.group(2) is None, p) for p in root.iterdir() if (m := _ANY_STEP.match(p.name))]
    return [(step, p) for step, _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def _dcp_index(path: Path):
    return dcp.FileSystemReader(str(path)).read_metadata()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _size_problem(path: Path, rel: str, size: int | None) -> str | None:
    f = path / rel
    if not f.is_file():
        return f"{rel} is missing"
    have = f.stat().st_size
    if size is None or have == size:
        return None
    if have < size:
        return f"{rel} is truncated ({have} of {size} bytes)"
    return f"{rel} has {have} bytes, {size} were written"


def damage(path: str | Path, export: bool = False) -> str | None:
    """Why the step directory `path` cannot be resumed from (a missing, truncated or unreadable file), or None.

    Cheap (no tensor is read): every file's size against the one meta.json recorded when it was
    written, then DCP's index, which must unpickle and whose byte ranges must lie inside their
    files. A checkpoint written before sizes were recorded gets the index check and presence only.
    The export is never read on resume, so its files are checked only with `export=True`.
    """
    path = Path(path)
    if path.name.endswith(".tmp"):
        return "an interrupted save (never renamed to complete)"
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return f"{META} is missing (the save did not complete)"
    except (OSError, ValueError) as e:
        return f"{META} is unreadable ({_first_line(e)})"
    expected = meta.get("files")
    if expected is None:  # written before sizes were recorded: which files must be there
        expected = {DCP_INDEX: None} if any(meta.get(k) for k in ("modules", "optimizers", "stateful")) else {}
        if meta.get("per_rank"):
            expected |= {rank_file_name(r): None for r in range(int(meta.get("world_size", 1)))}
    for rel, size in expected.items():
        if (export or not rel.startswith("export/")) and (problem := _size_problem(path, rel, size)):
            return problem
    if (path / DCP_INDEX).is_file():
        try:
            index = _dcp_index(path)
        except Exception as e:  # a truncated or foreign pickle: whatever unpickling raised
            return f"{DCP_INDEX} is unreadable ({_first_line(e)})"
        ends: dict[str, int] = {}
        for info in index.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for rel, end in sorted(ends.items()):
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size < end:
                return f"{rel} is truncated ({f.stat().st_size} bytes, DCP's index reaches byte {end})"
    return None


def _previous_intact(path: Path) -> Path | None:
    """The newest loadable checkpoint older than `path` in its checkpoints/ directory."""
    m = _ANY_STEP.match(path.name)
    step = int(m.group(1)) if m else None
    for s, p in reversed(complete_checkpoints(path.parent.parent)):
        if (step is None or s < step) and p != path and damage(p) is None:
            return p
    return None


def _what_to_do(path: Path) -> str:
    previous = _previous_intact(path)
    if previous is not None:
        return f"the previous complete step is {previous} (resume={previous})"
    return f"there is no earlier complete checkpoint in {path.parent}"


def check_intact(path: str | Path) -> None:
    """Raise DamagedCheckpoint naming the file, the cause and the previous complete step, if `path` is damaged."""
    path = Path(path)
    cause = damage(path)
    if cause is not None:
        raise DamagedCheckpoint(f"checkpoint {path} cannot be loaded: {cause}; {_what_to_do(path)}")


def find_checkpoint(path: str | Path) -> Path:
    """A step directory from a step directory, a run directory or its checkpoints/ directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist; expected {_WHERE}")
    if _ANY_STEP.match(p.name):
        if p.name.endswith(".tmp") or not (p / META).is_file():
            raise FileNotFoundError(f"checkpoint {p} is incomplete: {damage(p)}; {_what_to_do(p)}")
        return p
    newest = latest(p) or (latest(p.parent) if p.name == CHECKPOINTS else None)
    if newest is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {p}; expected {_WHERE} "
            "(step_XXXXXX.tmp directories are interrupted saves and are never loaded)"
        )
    return newest


def newest_intact(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest loadable checkpoint of run_dir, and the newer step directories passed over, with why."""
    passed = []
    for _, p in reversed(_step_dirs(Path(run_dir) / CHECKPOINTS)):
        cause = damage(p)
        if cause is None:
            return p, passed
        passed.append((p, cause))
    return None, passed


def resolve_resume(resume: str | Path | None, run_dir: str | Path) -> Path | None:
    """`None` -> start fresh; `"latest"` -> newest loadable checkpoint of run_dir or None; else a path.

    `latest` says so when it starts fresh, and warns when it passes over a damaged or interrupted
    newer step; an explicit path is refused if damaged. Run it on one rank (it logs):
    CheckpointManager.prepare_resume does, for every rank.
    """
    if resume is None:
        return None
    if str(resume) != "latest":
        path = find_checkpoint(resume)
        check_intact(path)
        return path
    root = Path(run_dir) / CHECKPOINTS
    found, passed = newest_intact(run_dir)
    why = "; ".join(f"{p.name}: {cause}" for p, cause in passed)
    if found is not None:
        if passed:
            log0("resume=latest: passing over %s; resuming from %s instead", why, found, level=logging.WARNING)
        return found
    if any(not p.name.endswith(".tmp") for p, _ in passed):
        raise DamagedCheckpoint(
            f"resume=latest: no loadable checkpoint in {root} ({why}); move the damaged step directories "
            "aside to start fresh here, or start fresh in a new run directory (hydra.run.dir=...)"
        )
    log0("resume=latest: no complete checkpoint in %s%s; starting fresh", root, f" ({why})" if passed else "")
    return None
