"""Process-group setup and the few collectives the trainer needs.

A single process started without torchrun is world size 1 of the same code: no process group is
created and every helper below degrades to the obvious local behaviour, so training, tests and
notebooks call the same functions.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# torchrun sets all of these; RANK alone is not enough to rendezvous.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    present = [k for k in _TORCHRUN_ENV if k in os.environ]
    if present and len(present) != len(_TORCHRUN_ENV):
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        raise RuntimeError(
            f"partial torchrun environment: {present} are set but {missing} are not; "
            "launch with torchrun, or unset them to run as a single process"
        )
    return bool(present)


def _export_submitit_env() -> None:
    """Under hydra-submitit-launcher (configs/hydra/launcher/slurm.yaml) every Slurm task is one rank:
    give it the variables torchrun would have set, from SLURM's."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device_type: str | None = None) -> Dist:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); safe to call twice.

    `device_type` "cpu" forces gloo on a machine with GPUs (CPU tests, debugging); None picks
    CUDA when it is available.
    """
    _export_submitit_env()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        # Before init so NCCL binds this rank to its own GPU rather than guessing cuda:0.
        torch.cuda.set_device(device)
    elif device_type == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"device_type must be 'cuda', 'cpu' or None, got {device_type!r}")
    if _launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return Dist(0, 1, local_rank, device)


def single_process_group(d: Dist) -> bool:
    """Give a process started without torchrun a process group of world size 1 (so FSDP and DCP run
    the same code as on many ranks); True if one was created here (the caller destroys it)."""
    if dist.is_initialized():
        return False
    store = dist.HashStore()
    if d.device.type == "cuda":
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=d.device)
    else:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return True


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of any picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a floating tensor over ranks, in place (and return it)."""
    if not dist.is_initialized():
        return tensor
    if dist.get_backend() == "nccl":
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    else:
        # gloo has no AVG.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def log0(msg: str, *args: Any, level: int = logging.INFO, _stacklevel: int = 1) -> None:
    """`logging` on rank 0 only, so N ranks do not print N copies."""
    if is_main():
        # stacklevel: records name the caller's file and line, not this helper's.
        logger.log(level, msg, *args, stacklevel=_stacklevel + 1)


def print0(*objs: Any) -> None:
    log0(" ".join(str(o) for o in objs), _stacklevel=2)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(cfg, local_rank: int = 0) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available; use device=cpu or auto")
    return torch.device("cuda", local_rank)


def agree_run_dir(own: Path) -> Path:
    """Rank 0's run directory, on every rank (a collective under torchrun).

    Each rank composes its own config, so `${now:...}` in hydra.run.dir may differ between ranks
    whose clocks or start times differ; checkpoints must not split across directories. A directory
    Hydra made for this rank alone, holding nothing but Hydra's own files, is removed."""
    agreed = Path(broadcast_object(str(own)))
    if agreed.resolve() != own.resolve() and own.is_dir():
        extra = [p.name for p in own.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
        if not extra:
            shutil.rmtree(own, ignore_errors=True)
        logger.warning("rank %d: run directory %s is rank 0's (this rank had composed %s%s)", get_rank(), agreed, own,
                       "" if not extra else f"; it holds {extra} and was kept")
    return agreed

