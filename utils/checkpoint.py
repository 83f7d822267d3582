"""Resumable checkpoints under `<run_dir>/checkpoints/step_XXXXXX/`, plus a consolidated export.

One call saves the registry of stateful things together (torchtitan's checkpointer, EDM2's
CheckpointIO). Modules and optimisers go through DCP's `get_*_state_dict`, so FSDP2 shards are
written by their owners and reshard on load at another world size. Other objects with
`state_dict()`/`load_state_dict()` (EMA, LR schedulers, data position) go through DCP too, so the
EMA's DTensor shards reshard like the model's and the rest is kept once, as global state. Plain
dicts (step, RNG states, config text) are per rank (`rank_XXXXX.pt`): RNG states differ by rank.

Everything is written to `step_XXXXXX.tmp/` and renamed once every rank has finished, so a
directory without `.tmp` is complete. The export (`export/model.safetensors`, `export/config.json`)
is for inference only and never read on resume (EDM2 keeps snapshots and training state apart).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from utils.distributed import all_gather_object, barrier, get_rank, get_world_size, is_main
from utils.fsdp import reshard

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_WHERE = "a step directory (<run_dir>/checkpoints/step_XXXXXX) or a run directory holding checkpoints/"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under run_dir, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    matches = ((_STEP_DIR.match(p.name), p) for p in root.iterdir())
    return sorted((int(m.group(1)), p) for m, p in matches if m and (p / META).is_file())


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | Path) -> Path:
    """A step directory from a step directory, a run directory or its checkpoints/ directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist; expected {_WHERE}")
    if _STEP_DIR.match(p.name) and (p / META).is_file():
        return p
    newest = latest(p) or (latest(p.parent) if p.name == CHECKPOINTS else None)
    if newest is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {p}; expected {_WHERE} "
            "(step_XXXXXX.tmp directories are interrupted saves and are never loaded)"
        )
    return newest


def resolve_resume(resume: str | Path | None, run_dir: str | Path) -> Path | None:
    """`None` -> start fresh; `"latest"` -> newest checkpoint of run_dir or None; else a path."""
    if resume is None:
        return None
    if str(resume) == "latest":
        return latest(run_dir)
    return find_checkpoint(resume)


def _split(state: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    modules, optims, stateful, plain = {}, {}, {}, {}
    for key, obj in state.items():
        if isinstance(obj, nn.Module):
            modules[key] = obj
        elif isinstance(obj, torch.optim.Optimizer):
            optims[key] = obj
        elif isinstance(obj, dict):
            plain[key] = obj
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            stateful[key] = obj
        else:
            raise TypeError(f"checkpoint state {key!r}: {type(obj).__name__} has no state_dict/load_state_dict")
    return modules, optims, stateful, plain


def _owner(key: str, optim: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    """The registered module holding all of an optimiser's parameters (DCP keys states by its FQNs)."""
    wanted = {id(p) for group in optim.param_groups for p in group["params"]}
    for module in modules.values():
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    raise ValueError(f"optimizer {key!r}: no module in the checkpoint state owns all of its parameters")


def _state_dicts(modules: dict, optims: dict, stateful: dict) -> tuple[dict[str, Any], dict]:
    """What DCP writes or fills in, per key; and each optimiser's owning module."""
    for module in modules.values():  # gathered FSDP units list their bf16 copies as parameters: back to the shards
        reshard(module)
    owners = {k: _owner(k, o, modules) for k, o in optims.items()}
    out: dict[str, Any] = {k: get_model_state_dict(m) for k, m in modules.items()}
    # On a fresh optimiser this initialises its states, so that DCP has tensors to load into.
    out |= {k: get_optimizer_state_dict(owners[k], o) for k, o in optims.items()}
    out |= {k: s.state_dict() for k, s in stateful.items()}
    return out, owners


def _tensors(tree: Any, prefix: str):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")


def _first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    for name, t in named:
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _dcp(fn, state_dict: dict, path: Path) -> None:
    """dcp.save / dcp.load; a single rank skips DCP's collectives (no_dist), writing the same format.

    On the CPU, DCP's distributed save path left the intra-op thread pool waking up slowly for the
    rest of the run: the toy default's steps took 1.7x as long after a checkpoint on 2 cores
    (0.72 -> 1.22 s; no_dist: 0.72 -> 0.64 s). With one rank there is nothing to coordinate.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        fn(state_dict, checkpoint_id=path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state_dict, checkpoint_id=path, no_dist=True)


def _per_rank_bytes(plain: dict[str, dict]) -> bytes:
    """Serialise the plain dicts, checking now that a weights_only load will accept them."""
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:
        raise TypeError(
            f"checkpoint state {sorted(plain)} must hold only tensors, numbers, strings, lists and dicts "
            f"(torch.load(weights_only=True) refuses the rest; e.g. store a config as OmegaConf.to_yaml(cfg)): {e}"
        ) from e
    return buffer.getvalue()


def _fsync(path: Path) -> None:
    """Data on disk before the rename that declares the checkpoint complete."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep = int(keep)

    def save(self, step: int, state: dict[str, Any], export: dict | None = None) -> Path:
        """Save on every rank (collective). `export` = {"weights": {name: tensor}, "config": dict}."""
        modules, optims, stateful, plain = _split(state)
        to_save, _ = _state_dicts(modules, optims, stateful)
        weights = self._export_weights(export)
        per_rank = _per_rank_bytes(plain)

        # Refuse before anything touches the disk; every rank must agree, so gather the verdicts.
        checked = [nt for k in (*modules, *stateful) for nt in _tensors(to_save[k], k)]
        checked += [(f"export.{k}", t) for k, t in weights.items()]
        bad = [b for b in all_gather_object(_first_nonfinite(checked)) if b is not None]
        if bad:
            raise FloatingPointError(f"refusing to save step {step}: {bad[0]} holds NaN or Inf; nothing was written")

        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if is_main():
            self._remove_interrupted()
            tmp.mkdir(parents=True)
        barrier()

        _dcp(dcp.save, to_save, tmp)
        rank_file = tmp / f"rank_{get_rank():05d}.pt"
        rank_file.write_bytes(per_rank)
        _fsync(rank_file)
        if is_main():
            if weights:
                self._write_export(tmp / "export", weights, export.get("config", {}))
            kinds = {"modules": modules, "optimizers": optims, "stateful": stateful, "per_rank": plain}
            meta = {"step": step, "world_size": get_world_size()} | {k: sorted(v) for k, v in kinds.items()}
            (tmp / META).write_text(json.dumps(meta, indent=2))
            _fsync(tmp / META)
        barrier()  # every rank's files are on disk before the directory becomes "complete"

        if is_main():
            if final.exists():  # saving the same step twice (e.g. a final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", final)
        return final

    @staticmethod
    def _export_weights(export: dict | None) -> dict[str, torch.Tensor]:
        if export is None:
            return {}
        unknown = set(export) - {"weights", "config"}
        if unknown:
            raise KeyError(f"export takes 'weights' and 'config', got unexpected {sorted(unknown)}")
        # full_tensor() is a collective: sharded export weights must be passed on every rank.
        return {
            k: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for k, t in export["weights"].items()
        }

    @staticmethod
    def _write_export(folder: Path, weights: dict[str, torch.Tensor], config: dict) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tensors = folder / "model.safetensors"
        save_file({k: t.cpu().contiguous() for k, t in weights.items()}, str(tensors))
        # safetensors writes 0600; give it the permissions of the files written beside it (0666 less
        # the umask), read from config.json rather than by setting the process-wide umask to read it
        os.chmod(tensors, stat.S_IMODE((folder / "config.json").stat().st_mode))
        _fsync(tensors)

    def _remove_interrupted(self) -> None:
        # Only the writer cleans up: a reader (inference on a live run) must not delete a save
        # that is still in progress, so load() merely ignores .tmp directories.
        if self.root.is_dir():
            for p in self.root.glob("step_*.tmp"):
                logger.warning("removing interrupted checkpoint %s", p)
                shutil.rmtree(p)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for _, p in complete_checkpoints(self.run_dir)[: -self.keep]:
            shutil.rmtree(p)

    def load(self, path: str | Path, state: dict[str, Any]) -> int:
        """Load a checkpoint (step dir or run dir) into `state`, in place; returns its step.

        Collective under torchrun. Only the keys of `state` are read, so inference can load just
        the generator or the EMA. Plain dicts are replaced in place from this rank's file; after a
        world-size change ranks without a file keep their current values (reseed them yourself).
        """
        path = find_checkpoint(path)
        meta = json.loads((path / META).read_text())
        modules, optims, stateful, plain = _split(state)
        for kind, keys in (("modules", modules), ("optimizers", optims), ("stateful", stateful), ("per_rank", plain)):
            missing = sorted(set(keys) - set(meta[kind]))
            if missing:
                raise KeyError(f"{path} has no {kind} {missing}; it holds {meta[kind]}")

        to_load, owners = _state_dicts(modules, optims, stateful)
        if to_load:
            _dcp(dcp.load, to_load, path)
        for k, m in modules.items():
            set_model_state_dict(m, to_load[k])
        for k, o in optims.items():
            set_optimizer_state_dict(owners[k], o, to_load[k])
        for k, s in stateful.items():
            s.load_state_dict(to_load[k])

        if plain:
            rank_file = path / f"rank_{get_rank():05d}.pt"
            if rank_file.is_file():
                saved = torch.load(rank_file, weights_only=True)
                for k, target in plain.items():
                    target.clear()
                    target.update(saved[k])
            else:
                logger.warning(
                    "%s was saved by %d ranks and has no file for rank %d; %s keep their current values",
                    path, meta["world_size"], get_rank(), sorted(plain),
                )
        logger.info("loaded checkpoint %s (step %d)", path, meta["step"])
        return int(meta["step"])
