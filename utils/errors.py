"""Expected errors end in one line, not a traceback; a failed start leaves no empty run directory.

Bad config values, missing or bad files and bad prompts raise ValueError / FileNotFoundError with a
message that names the key or file and what was expected: that message is all a user needs. A
traceback is printed for them only with `debug=true` or HYDRA_FULL_ERROR=1 (Hydra's own switch);
any other exception keeps its traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

EXPECTED = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)
HYDRA_FILES = (".hydra",)  # what Hydra writes into a run directory before the job starts, with <job>.log


def nothing_written(run_dir: Path) -> bool:
    """Whether run_dir holds only what Hydra wrote before the job started."""
    return run_dir.is_dir() and all(p.name in HYDRA_FILES or p.suffix == ".log" for p in run_dir.iterdir())


def remove_empty_run_dir(run_dir: Path) -> bool:
    """Remove a run directory holding only Hydra's files, and the date folders above it left empty."""
    if not nothing_written(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in list(run_dir.parents)[:2]:  # outputs/<date>/<time>: the <date> folder, then outputs/
        if parent.is_dir() and not any(parent.iterdir()) and Path.cwd() in parent.parents:
            parent.rmdir()
    return True


@contextmanager
def one_line_errors(run_dir: Path | None = None, debug: bool = False, hint: str = "debug=true or HYDRA_FULL_ERROR=1"):
    try:
        yield
    except BaseException as error:
        note = ""
        if run_dir is not None and remove_empty_run_dir(run_dir):
            note = f" (nothing was written: the run directory {run_dir} was removed)"
        if not isinstance(error, EXPECTED) or debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            if note:
                print(note.strip(" ()"), file=sys.stderr)
            raise
        print(f"error: {error}{note}", file=sys.stderr)
        print(f"({hint} shows the traceback)", file=sys.stderr)
        sys.exit(1)
