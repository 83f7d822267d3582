"""Nothing lost, nothing silent (issue 22): the export has the same permissions as the files beside it."""

import os
import stat

import pytest
import torch
import torch.nn as nn

from utils.checkpoint import CheckpointManager


def state(seed=0, hidden=8, meta="a: 1"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    return {"model": model, "optim": torch.optim.AdamW(model.parameters()), "meta": {"config": meta}}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_export_has_the_permissions_of_the_files_beside_it(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = CheckpointManager(tmp_path, keep=0).save(1, state(), export={"weights": {"w": torch.ones(3)}, "config": {}})
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    export = path / "export"
    assert mode(export / "model.safetensors") == mode(export / "config.json") == 0o666 & ~umask
