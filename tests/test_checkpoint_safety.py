"""Nothing lost, nothing silent (issue 22): a resumed run never prunes another run's checkpoints or
the one it resumed from before it has its own; a run refuses newer steps of another run in its
directory or moves them aside; damaged checkpoints are named with their cause and the previous
complete step; config changes are a warning and shape changes one line; the export has the same
permissions as the files beside it."""

import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import train
import utils.checkpoint as ckpt
from engine.config import validate
from tests.dist_setup import spawn_ranks
from tests.train_setup import compose_config
from utils.checkpoint import CheckpointManager, config_changes, read_per_rank
from utils.checkpoint_dirs import DamagedCheckpoint, resolve_resume
from utils.distributed import barrier, init_distributed


@pytest.fixture
def logs():
    """Records of the project's loggers (pytest runs with -p no:logging, so no caplog)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("utils", "engine")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    yield records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def said(records, level) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level]


def state(seed=0, hidden=8, meta="a: 1"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    return {"model": model, "optim": torch.optim.AdamW(model.parameters()), "meta": {"config": meta}}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def steps(*numbers) -> list[str]:
    return [f"step_{n:06d}" for n in numbers]


# ---------------------------------------------------------------------------- nothing lost
def test_resuming_an_older_step_refuses_then_moves_the_newer_steps_aside(tmp_path, logs):
    earlier = CheckpointManager(tmp_path, keep=0)
    for step in (2, 4, 6, 8):
        earlier.save(step, state())
    root = tmp_path / "checkpoints"
    resumed = CheckpointManager(tmp_path, keep=2)

    with pytest.raises(ValueError) as refused:
        resumed.prepare_resume(root / "step_000002")
    message = str(refused.value)
    assert "\n" not in message
    assert "resuming from step 2" in message and "step_000004, step_000006, step_000008" in message
    assert "hydra.run.dir=" in message and "checkpoint.move_newer=true" in message
    assert names(root) == steps(2, 4, 6, 8)  # refused before anything moved

    assert resumed.prepare_resume(root / "step_000002", move_newer=True) == root / "step_000002"
    aside = root / "abandoned_from_step_000002"
    assert names(aside) == steps(4, 6, 8)
    assert any(str(aside) in m and "step_000008" in m for m in said(logs, logging.WARNING))
    assert resumed.load(root / "step_000002", state(seed=1)) == 2

    resumed.save(4, state())
    assert names(root) == ["abandoned_from_step_000002", *steps(2, 4)]  # kept until keep=2 of its own exist
    resumed.save(5, state())
    assert names(root) == ["abandoned_from_step_000002", *steps(4, 5)]
    assert names(aside) == steps(4, 6, 8)  # the abandoned run is whole
    assert resolve_resume("latest", tmp_path) == root / "step_000005"  # latest now means the new run


def test_a_fresh_start_among_checkpoints_is_refused_or_moves_them(tmp_path):
    CheckpointManager(tmp_path, keep=0).save(3, state())
    with pytest.raises(ValueError, match=r"^starting fresh in .* already holds later steps of another run \(step_000003\).*"
                                         r"resume=latest to continue that run, or pass checkpoint.move_newer=true"):
        CheckpointManager(tmp_path, keep=1).prepare_resume(None)
    assert CheckpointManager(tmp_path, keep=1).prepare_resume(None, move_newer=True) is None
    assert names(tmp_path / "checkpoints") == ["abandoned_from_step_000000"]


def test_pruning_removes_only_this_runs_line(tmp_path):
    # An unrelated run's checkpoint in the directory; the run resumes from a checkpoint elsewhere.
    here, there = tmp_path / "here", tmp_path / "there"
    CheckpointManager(here, keep=0).save(1, state())
    CheckpointManager(there, keep=0).save(3, state())
    run = CheckpointManager(here, keep=2)
    run.load(run.prepare_resume(there / "checkpoints" / "step_000003"), state())
    for step in (4, 5, 6):
        run.save(step, state())
    assert names(here / "checkpoints") == steps(1, 5, 6)
    assert names(there / "checkpoints") == steps(3)

    # Resumed again and again in one directory, a run's older checkpoints are still pruned (no leak).
    chain = tmp_path / "chain"
    first = CheckpointManager(chain, keep=2)
    for step in (1, 2, 3):
        first.save(step, state())
    for step in (4, 5):
        again = CheckpointManager(chain, keep=2)
        again.load(again.prepare_resume("latest"), state())
        again.save(step, state())
    assert names(chain / "checkpoints") == steps(4, 5)


# ---------------------------------------------------------------------------- nothing silent
def test_latest_with_no_checkpoint_says_it_starts_fresh(tmp_path, logs):
    manager = CheckpointManager(tmp_path, keep=0)
    assert manager.prepare_resume("latest") is None
    assert said(logs, logging.INFO) == [f"resume=latest: no complete checkpoint in {tmp_path / 'checkpoints'}; starting fresh"]
    (tmp_path / "checkpoints" / "step_000002.tmp").mkdir(parents=True)  # killed in its first save
    assert manager.prepare_resume("latest") is None
    assert "step_000002.tmp: an interrupted save" in said(logs, logging.INFO)[-1]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unrecorded(step_dir: Path) -> None:
    """As written before meta.json recorded file sizes."""
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["files"]
    (step_dir / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated shard": (lambda d: truncate(d / "__0_0.distcp"), r"__0_0\.distcp is truncated \(\d+ of \d+ bytes\)"),
    "truncated index": (lambda d: truncate(d / ".metadata"), r"\.metadata is truncated \(\d+ of \d+ bytes\)"),
    "missing rank file": (lambda d: (d / "rank_00000.pt").unlink(), r"rank_00000\.pt is missing"),
    "missing meta.json": (lambda d: (d / "meta.json").unlink(), r"meta\.json is missing"),
    "garbled meta.json": (lambda d: (d / "meta.json").write_text("{"), r"meta\.json is unreadable"),
    "older format, truncated shard": (lambda d: (unrecorded(d), truncate(d / "__0_0.distcp")),
                                      r"__0_0\.distcp is truncated \(\d+ bytes, DCP's index reaches byte \d+\)"),
    "older format, truncated index": (lambda d: (unrecorded(d), truncate(d / ".metadata")), r"\.metadata is unreadable"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_named_with_its_cause_and_the_previous_step(tmp_path, logs, kind):
    damage, cause = DAMAGE[kind]
    manager = CheckpointManager(tmp_path, keep=0)
    export = {"weights": {"w": torch.ones(3)}, "config": {}}
    for step in (2, 4):
        manager.save(step, state(), export=export)
    root = tmp_path / "checkpoints"
    good, bad = root / "step_000002", root / "step_000004"
    damage(bad)

    # Given explicitly: refused, in one line naming the file, the cause and the step to use instead.
    for attempt in (lambda: manager.prepare_resume(bad), lambda: CheckpointManager(tmp_path, keep=0).load(bad, state())):
        with pytest.raises((ValueError, FileNotFoundError)) as refused:
            attempt()
        message = str(refused.value)
        assert "\n" not in message and str(bad) in message
        assert re.search(cause, message), message
        assert f"the previous complete step is {good}" in message

    # resume=latest: falls back, loudly.
    assert manager.prepare_resume("latest") == good
    warned = said(logs, logging.WARNING)
    assert len(warned) == 1 and "step_000004" in warned[0] and str(good) in warned[0]
    assert re.search(cause, warned[0]), warned[0]


def test_a_damaged_newest_step_is_kept_aside_when_the_run_reaches_it(tmp_path):
    first = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4):
        first.save(step, state())
    root = tmp_path / "checkpoints"
    truncate(root / "step_000004" / "__0_0.distcp")
    again = CheckpointManager(tmp_path, keep=2)
    again.load(again.prepare_resume("latest"), state())  # step 2; the damaged 4 is no refusal
    again.save(3, state())
    again.save(4, state())
    assert names(root) == ["displaced_step_000004", *steps(3, 4)]
    assert ckpt.damage(root / "displaced_step_000004" / "step_000004") is not None
    assert ckpt.damage(root / "step_000004") is None


def test_latest_with_only_damaged_checkpoints_refuses(tmp_path):
    CheckpointManager(tmp_path, keep=0).save(2, state())
    (tmp_path / "checkpoints" / "step_000002" / "rank_00000.pt").unlink()
    with pytest.raises(DamagedCheckpoint, match=r"^resume=latest: no loadable checkpoint in .*rank_00000\.pt is missing"):
        resolve_resume("latest", tmp_path)


def test_sizes_are_recorded_and_a_grown_run_keeps_its_new_ranks_values(tmp_path, logs, monkeypatch):
    path = CheckpointManager(tmp_path, keep=0).save(1, state(), export={"weights": {"w": torch.ones(3)}, "config": {}})
    files = json.loads((path / "meta.json").read_text())["files"]
    assert {"__0_0.distcp", ".metadata", "rank_00000.pt", "export/model.safetensors", "export/config.json"} <= set(files)
    assert all(files[rel] == (path / rel).stat().st_size for rel in files)
    # The export is for inference, never read on resume: its damage is named only when asked for.
    truncate(path / "export" / "model.safetensors")
    assert ckpt.damage(path) is None
    assert re.fullmatch(r"export/model\.safetensors is truncated \(\d+ of \d+ bytes\)", ckpt.damage(path, export=True))

    # Rank 1 of a run grown to 2 ranks: no file of its own is expected, so its plain dicts are kept.
    monkeypatch.setattr(ckpt, "get_rank", lambda: 1)
    loaded = state(seed=1, meta="mine")
    assert CheckpointManager(tmp_path, keep=0).load(path, loaded) == 1
    assert loaded["meta"] == {"config": "mine"}
    assert torch.equal(loaded["model"][0].weight, state()["model"][0].weight)
    assert any("has no file for rank 1" in m for m in said(logs, logging.WARNING))


def test_a_model_of_another_shape_is_one_line_naming_keys_and_shapes(tmp_path):
    path = CheckpointManager(tmp_path, keep=0).save(1, state(hidden=8))
    with pytest.raises(ValueError) as wider:
        CheckpointManager(tmp_path, keep=0).load(path, state(hidden=16))
    message = str(wider.value)
    assert "\n" not in message and message.startswith(f"checkpoint {path} does not fit")
    assert "model.0.weight: [16, 4] here, [8, 4] in the checkpoint" in message
    with pytest.raises(ValueError, match=r"2 tensors of the checkpoint are not in the model \(model\.2\.bias; model\.2\.weight\)"):
        CheckpointManager(tmp_path, keep=0).load(path, {"model": nn.Sequential(nn.Linear(4, 8))})


def test_config_changes_name_dotted_keys_old_and_new():
    saved = "max_steps: 10\nmethod:\n  guidance_scale: 3.0\n  steps: [1, 2]\nlogger: {every: 1}\n"
    current = "max_steps: 20\nmethod:\n  guidance_scale: 4.0\n  steps: [1, 2]\n  extra: x\nlogger: {every: 5}\n"
    assert config_changes(saved, current, ignore=("max_steps", "logger")) == [
        "method.extra: <absent> -> x", "method.guidance_scale: 3.0 -> 4.0"]


# ---------------------------------------------------------------------------- two ranks agree
def _two_rank_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed("cpu")
    root, seen = out / "checkpoints", {}
    manager = CheckpointManager(out, keep=0)
    for step in (2, 4):
        manager.save(step, {**state(), "ranked": {"rank": rank}})
    attempts = {
        "older": lambda: manager.prepare_resume(root / "step_000002"),
        "damaged": lambda: manager.load(root / "step_000004", {**state(), "ranked": {}}),
    }
    for name, attempt in attempts.items():
        if name == "damaged" and rank == 0:
            (root / "step_000004" / "rank_00001.pt").unlink()  # rank 1's own file
        barrier()
        try:
            attempt()
            seen[name] = None
        except ValueError as e:
            seen[name] = str(e)
    ranked = {}
    seen["latest"] = str(manager.load(manager.prepare_resume("latest"), {**state(), "ranked": ranked}))
    seen["ranked"] = ranked["rank"]
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    barrier()  # tear gloo down together
    torch.distributed.destroy_process_group()


def test_every_rank_refuses_together(tmp_path):
    spawn_ranks(_two_rank_worker, 2, tmp_path)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, s in enumerate(seen):
        assert "resuming from step 2" in s["older"] and "step_000004" in s["older"]
        assert "rank_00001.pt is missing" in s["damaged"] and "step_000002" in s["damaged"]
        assert s["latest"] == "2" and s["ranked"] == rank


# ---------------------------------------------------------------------------- the export
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


# ---------------------------------------------------------------------------- through train.py
@pytest.mark.slow
def test_training_refuses_moves_aside_warns_and_stops_in_one_line(tmp_path, logs):
    run_dir = tmp_path / "P"
    root = run_dir / "checkpoints"

    def run(*overrides):
        cfg = compose_config(*overrides)
        validate(cfg)
        return train.train(cfg, run_dir)

    run("max_steps=3")  # steps 1, 2, 3 (checkpoint.every=1, keep=0)
    with pytest.raises(ValueError, match=r"resuming from step 2 .*\(step_000003\).*checkpoint\.move_newer=true"):
        run("max_steps=3", f"resume={root / 'step_000002'}")
    assert names(root) == steps(1, 2, 3)

    run("max_steps=3", f"resume={root / 'step_000002'}", "checkpoint.move_newer=true")
    assert names(root / "abandoned_from_step_000002") == steps(3)
    weights = [load_file(d / "step_000003" / "export" / "model.safetensors") for d in (root, root / "abandoned_from_step_000002")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the same step 3 again: resume is exact

    logs.clear()
    run("max_steps=4", "resume=latest", "method.guidance_scale=2.5")
    changed = [m for m in said(logs, logging.WARNING) if "config keys changed" in m]
    keys = changed[0].split("changed: ")[1] if len(changed) == 1 else ""
    assert re.fullmatch(r"method\.guidance_scale: \S+ -> 2\.5", keys), changed  # not max_steps, not resume
    assert "guidance_scale: 2.5" in read_per_rank(root / "step_000004")["meta"]["config"]  # what step 4 trained with

    with pytest.raises(ValueError) as misfit:
        run("max_steps=5", "resume=latest", "model.backbone.ffn_dim=48")
    message = str(misfit.value)
    assert "\n" not in message and message.startswith(f"checkpoint {root / 'step_000004'} does not fit")
    assert re.search(r"generator\.\S+: \[48, 16\] here, \[32, 16\] in the checkpoint", message), message
    assert any("model.backbone.ffn_dim: 32 -> 48" in m for m in said(logs, logging.WARNING))
