"""Resumable checkpoints under `<run_dir>/checkpoints/step_XXXXXX/`, plus a consolidated export.

One call saves the registry of stateful things together (torchtitan's checkpointer, EDM2's
CheckpointIO). Modules and optimisers go through DCP's `get_*_state_dict`, so FSDP2 shards are
written by their owners and reshard on load at another world size. Other objects with
`state_dict()`/`load_state_dict()` (EMA, LR schedulers, data position) go through DCP too, so the
EMA's DTensor shards reshard like the model's and the rest is kept once, as global state. Plain
dicts (step, RNG states, config text) are per rank (`rank_XXXXX.pt`): RNG states differ by rank.

Everything is written to `step_XXXXXX.tmp/` and renamed once every rank has finished, so a
directory without `.tmp` is complete. The export (`export/model.safetensors`, `export/config.json`)
is for inference only and never read on resume (EDM2 keeps snapshots and training state apart). A LoRA
generator's export is a peft adapter (`export/adapter_model.safetensors`, `export/adapter_config.json`;
engine/lora.py), with or without the merged `model.safetensors`.

Nothing lost, nothing silent:
- `meta.json` records every file's size, so a truncated or missing file is named before DCP reads
  it (`damage`); `resume=latest` passes over a damaged newest step with a warning, an explicit
  path refuses it, naming the previous complete step.
- A checkpoint records its run and the runs it continues (`lineage`): pruning removes only this
  run's line of checkpoints, never another run's that shares the directory; and a run refuses to
  start in a directory holding newer steps of another run (`prepare_resume`), unless asked to move
  them aside (checkpoint.move_newer), because `latest` and pruning go by step number.
- Shapes are compared with DCP's index before loading: a model of another size is one line naming
  the tensors and both shapes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from utils.checkpoint_dirs import (
    CHECKPOINTS,
    EXPORT_ADAPTER,
    EXPORT_ADAPTER_CONFIG,
    META,
    DamagedCheckpoint,
    _dcp_index,
    _step_dirs,
    _what_to_do,
    check_intact,
    complete_checkpoints,
    damage,
    find_checkpoint,
    rank_file_name,
    read_meta,
    resolve_resume,
    step_dir_name,
)
from utils.distributed import all_gather_object, barrier, broadcast_object, get_rank, get_world_size, is_main, log0
from utils.fsdp import reshard

logger = logging.getLogger(__name__)

def _agreed(fn):
    """fn() on rank 0; its result, or its exception, on every rank (so that all ranks refuse together)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:
            outcome = ("error", e)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        if is_main():
            raise outcome[1]
        raise value
    return value


def read_per_rank(path: str | Path, rank: int = 0) -> dict:
    """The plain dicts one rank saved (step, RNG states, config text), without loading anything else."""
    return torch.load(Path(path) / rank_file_name(rank), weights_only=True)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: node}


def config_changes(saved: str, current: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for each dotted key whose value differs between two YAML configs, keys
    equal to or under an `ignore` entry excepted (a missing key reads <absent>)."""
    old, new = (_flat(OmegaConf.to_container(OmegaConf.create(text), resolve=False)) for text in (saved, current))
    skip = lambda k: any(k == i or k.startswith(i + ".") for i in ignore)  # noqa: E731
    absent = "<absent>"
    return [f"{k}: {old.get(k, absent)} -> {new.get(k, absent)}" for k in sorted(old.keys() | new.keys())
            if not skip(k) and old.get(k, absent) != new.get(k, absent)]


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


def _sizes(folder: Path) -> dict[str, int]:
    """{relative path: bytes} of every file under folder: what load() checks for truncation."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _fsync(path: Path) -> None:
    """Data on disk before the rename that declares the checkpoint complete."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _some(names: list[str], n: int = 3) -> str:
    return "; ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _misfit(to_load: dict[str, Any], index, modules: dict) -> str | None:
    """What of `to_load` the checkpoint cannot fill (DCP's index: global shapes by flattened name), or None."""
    saved = index.state_dict_metadata
    shapes, absent, extra = [], [], []
    for key, tree in to_load.items():
        for name, t in _tensors(tree, key):
            entry = saved.get(name)
            if entry is None:
                absent.append(name)
            elif not hasattr(entry, "size"):
                shapes.append(f"{name}: a tensor {list(t.shape)} here, not a tensor in the checkpoint")
            elif tuple(entry.size) != tuple(t.shape):
                shapes.append(f"{name}: {list(t.shape)} here, {list(entry.size)} in the checkpoint")
    for key in modules:  # a module's state is all tensors: any other saved name is a parameter it lacks
        ours = {name for name, _ in _tensors(to_load[key], key)}
        extra += [name for name in saved if name.startswith(key + ".") and name not in ours]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape ({_some(shapes)})")
    if absent:
        parts.append(f"{len(absent)} tensors are not in the checkpoint ({_some(absent)})")
    if extra:
        parts.append(f"{len(extra)} tensors of the checkpoint are not in the model ({_some(sorted(extra))})")
    return "; ".join(parts) or None


class CheckpointManager:
    """Saves, loads and prunes the checkpoints of one run directory, for one run (`run_id`).

    The run's line of checkpoints is its own plus those of the runs it continues, up to the step each
    was left at (`lineage`, set by `load`); only those are pruned. The id is drawn per process;
    rank 0's is the one written, as rank 0 writes meta.json and prunes.
    """

    def __init__(self, run_dir: str | Path, keep: int):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep = int(keep)
        self.run_id = uuid.uuid4().hex[:12]
        self.lineage: list[list] = []  # [[run id, last step], ...]: the runs this one continues

    def prepare_resume(self, resume: str | Path | None, move_newer: bool = False) -> Path | None:
        """The checkpoint to resume from (None: start fresh), agreed by every rank (a collective).

        resolve_resume, then: newer complete steps of another run in this run directory are refused,
        or with `move_newer` moved aside into checkpoints/abandoned_from_step_XXXXXX/, before training.
        Left in place they would mix two runs: resume=latest would later continue the newer one, and
        the new run's checkpoints would be numbered among theirs.
        """
        return _agreed(lambda: self._prepare_resume(resume, move_newer))

    def _prepare_resume(self, resume: str | Path | None, move_newer: bool) -> Path | None:
        path = resolve_resume(resume, self.run_dir)
        step = int(read_meta(path)["step"]) if path is not None else 0
        newer = [p for s, p in _step_dirs(self.root) if s > step and not p.name.endswith(".tmp")]
        if all(damage(p) is not None for p in newer):  # none, or damaged ones latest passed over loudly: saves displace them
            return path
        aside = self.root / f"abandoned_from_step_{step:06d}"
        if not move_newer:
            listed = ", ".join(p.name for p in newer)
            doing = f"resuming from step {step}" if path is not None else "starting fresh"
            also = "" if path is not None else ", resume=latest to continue that run"
            raise ValueError(
                f"{doing} in {self.run_dir}, but its checkpoints/ already holds later steps of another run ({listed}), "
                f"which resume=latest and pruning would mix with this one (they go by step number). Use a new run "
                f"directory (hydra.run.dir=...){also}, or pass checkpoint.move_newer=true to move them into {aside}/"
            )
        moved = self._move_aside(newer, aside.name)
        log0("checkpoint.move_newer: moved %s into %s; resume=latest now continues this run",
             ", ".join(p.name for p in newer), moved, level=logging.WARNING)
        return path

    def _move_aside(self, paths: list[Path], name: str) -> Path:
        """Move step directories into a new folder of checkpoints/ (name, or name_2, ... if taken)."""
        folder, n = self.root / name, 1
        while folder.exists():
            n += 1
            folder = self.root / f"{name}_{n}"
        folder.mkdir(parents=True)
        for p in paths:
            os.replace(p, folder / p.name)
        return folder

    def _ours(self, path: Path, step: int) -> bool:
        """Whether a checkpoint of this directory is of this run's line (written by it or by a run it continues)."""
        try:
            run = read_meta(path).get("run")
        except (OSError, ValueError):
            return False
        bounds = {r: s for r, s in self.lineage}
        return run == self.run_id or (run in bounds and step <= bounds[run])

    def save(self, step: int, state: dict[str, Any], export: dict | None = None) -> Path:
        """Save on every rank (collective). `export` = {"weights": {name: tensor}, "config": dict} and, for a
        LoRA generator, "adapter": {peft name: tensor}, "adapter_config": dict (weights then may be {})."""
        modules, optims, stateful, plain = _split(state)
        to_save, _ = _state_dicts(modules, optims, stateful)
        weights, adapter = self._export_weights(export, "weights"), self._export_weights(export, "adapter")
        per_rank = _per_rank_bytes(plain)

        # Refuse before anything touches the disk; every rank must agree, so gather the verdicts.
        checked = [nt for k in (*modules, *stateful) for nt in _tensors(to_save[k], k)]
        checked += [(f"export.{k}", t) for k, t in (weights | adapter).items()]
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
        rank_file = tmp / rank_file_name(get_rank())
        rank_file.write_bytes(per_rank)
        _fsync(rank_file)
        if is_main() and (weights or adapter):
            self._write_export(tmp / "export", weights, export.get("config", {}), adapter, export.get("adapter_config"))
        barrier()  # every rank's files are on disk: rank 0 records their sizes, then declares the step complete

        if is_main():
            kinds = {"modules": modules, "optimizers": optims, "stateful": stateful, "per_rank": plain}
            meta = {"step": step, "world_size": get_world_size(), "run": self.run_id, "lineage": self.lineage}
            meta |= {k: sorted(v) for k, v in kinds.items()} | {"files": _sizes(tmp)}
            (tmp / META).write_text(json.dumps(meta, indent=2))
            _fsync(tmp / META)
            if final.exists():
                if self._ours(final, step):  # saving the same step twice (a final save right after a periodic one)
                    shutil.rmtree(final)
                else:  # another run's (damaged) step: kept, out of the way
                    moved = self._move_aside([final], f"displaced_step_{step:06d}")
                    logger.warning("%s was not this run's; moved it into %s", final, moved)
            os.replace(tmp, final)
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", final)
        return final

    @staticmethod
    def _export_weights(export: dict | None, part: str) -> dict[str, torch.Tensor]:
        if export is None:
            return {}
        unknown = set(export) - {"weights", "config", "adapter", "adapter_config"}
        if unknown:
            raise KeyError(f"export takes 'weights', 'config', 'adapter' and 'adapter_config', got unexpected {sorted(unknown)}")
        # full_tensor() is a collective: sharded export weights must be passed on every rank.
        return {
            k: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for k, t in export.get(part, {}).items()
        }

    @staticmethod
    def _write_export(folder: Path, weights: dict[str, torch.Tensor], config: dict,
                      adapter: dict[str, torch.Tensor], adapter_config: dict | None) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if adapter:
            (folder / EXPORT_ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        # the adapter's config also in its file's metadata, where diffusers' load_lora_adapter reads it (its alpha)
        lora_metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_config, indent=2, sort_keys=True)}
        for name, tensors, metadata in (("model.safetensors", weights, None), (EXPORT_ADAPTER, adapter, lora_metadata)):
            if not tensors:
                continue
            save_file({k: t.cpu().contiguous() for k, t in tensors.items()}, str(folder / name), metadata=metadata)
            # safetensors writes 0600; give it the permissions of the files written beside it (0666 less
            # the umask), read from config.json rather than by setting the process-wide umask to read it
            os.chmod(folder / name, stat.S_IMODE((folder / "config.json").stat().st_mode))
            _fsync(folder / name)

    def _remove_interrupted(self) -> None:
        # Only the writer cleans up: a reader (inference on a live run) must not delete a save
        # that is still in progress, so load() merely ignores .tmp directories.
        if self.root.is_dir():
            for p in self.root.glob("step_*.tmp"):
                logger.warning("removing interrupted checkpoint %s", p)
                shutil.rmtree(p)

    def _prune(self) -> None:
        """Keep this run's line's newest `keep`; another run's checkpoints are never removed."""
        if self.keep <= 0:
            return
        ours = [p for s, p in complete_checkpoints(self.run_dir) if self._ours(p, s)]
        for p in ours[: -self.keep]:
            shutil.rmtree(p)

    def load(self, path: str | Path, state: dict[str, Any]) -> int:
        """Load a checkpoint (step dir or run dir) into `state`, in place; returns its step.

        Collective under torchrun. Only the keys of `state` are read, so inference can load just
        the generator or the EMA. A damaged checkpoint, or one whose tensors do not fit `state`'s
        shapes, is refused before anything is read. Plain dicts are replaced in place from this
        rank's file; after a world-size change ranks without a file keep their current values
        (reseed them yourself). This run's line continues the loaded checkpoint's (`lineage`).
        """
        path = find_checkpoint(path)
        _agreed(lambda: check_intact(path))
        meta = read_meta(path)
        modules, optims, stateful, plain = _split(state)
        for kind, keys in (("modules", modules), ("optimizers", optims), ("stateful", stateful), ("per_rank", plain)):
            missing = sorted(set(keys) - set(meta[kind]))
            if missing:
                raise KeyError(f"{path} has no {kind} {missing}; it holds {meta[kind]}")

        to_load, owners = _state_dicts(modules, optims, stateful)
        if to_load:
            misfit = _agreed(lambda: _misfit(to_load, _dcp_index(path), modules))
            if misfit is not None:
                raise ValueError(f"checkpoint {path} does not fit what is being loaded: {misfit}; it was saved "
                                 "with another model configuration (resume from a checkpoint of this model, or build "
                                 "the model it was saved with)")
            _dcp(dcp.load, to_load, path)
        for k, m in modules.items():
            set_model_state_dict(m, to_load[k])
        for k, o in optims.items():
            set_optimizer_state_dict(owners[k], o, to_load[k])
        for k, s in stateful.items():
            s.load_state_dict(to_load[k])

        if plain:
            rank_file = path / rank_file_name(get_rank())
            if rank_file.is_file():
                saved = torch.load(rank_file, weights_only=True)
                for k, target in plain.items():
                    target.clear()
                    target.update(saved[k])
            elif get_rank() < meta["world_size"]:  # damage() saw it a moment ago: gone since
                raise DamagedCheckpoint(f"checkpoint {path} cannot be loaded: {rank_file.name} is missing; "
                                        f"{_what_to_do(path)}")
            else:
                logger.warning(
                    "%s was saved by %d ranks and has no file for rank %d; %s keep their current values",
                    path, meta["world_size"], get_rank(), sorted(plain),
                )
        step = int(meta["step"])
        lineage = meta.get("lineage", [])
        if "run" in meta or path.parent.resolve() == self.root.resolve():  # an unmarked (older) checkpoint: only here
            lineage = [*lineage, [meta.get("run"), step]]
        self.lineage = lineage
        logger.info("loaded checkpoint %s (step %d)", path, step)
        return step
