"""Training data on disk: prompt lists, and safetensors shards of video latents or ODE pairs.

Every dataset here is map-style and returns item i the same way on every process. Sharding across
ranks is Batches' job (below): each rank asks for its own indices of each global batch,
so there is no DistributedSampler, and the data position is the training step itself.

Shard folders (written by scripts/encode_videos.py and scripts/generate_ode_pairs.py):

    <folder>/shard_<index of its first item, 8 digits>.safetensors
        tensor    "latents" [N, F, C, H, W]        (LatentShards, CausVid)
               or "ode"     [N, S+1, F, C, H, W]   (ODEPairShards: states at the S student steps, then the clip)
        metadata  "prompts": a JSON list of the N prompts; other keys: JSON values of the settings
                  the shard was made with (checked against `expect`)

Shards made by other tools may carry their prompts in a sidecar <shard stem>.json (a JSON list)
instead. safetensors, not LMDB: one file per shard holds tensors and prompts together, is read
lazily item by item, and needs no extra dependency.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

SHARD_GLOB = "shard_*.safetensors"


class PromptFile(Dataset):
    """One prompt per line (VidProM, MovieGenBench lists); blank lines are skipped, spaces stripped."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"prompt file {self.path} does not exist; expected a text file with one prompt per line "
                "(e.g. the reference's prompts/vidprom_filtered_extended.txt); set data.prompts.path or PROMPTS_PATH"
            )
        lines = self.path.read_text(encoding="utf-8").splitlines()
        self.prompts = [line.strip() for line in lines if line.strip()]
        if not self.prompts:
            raise ValueError(f"prompt file {self.path} holds no prompts (it is empty or has only blank lines)")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


# ---------------------------------------------------------------- writing shards
def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) of every shard: consecutive items, so a shard's name fixes its contents."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def rank_shards(num_items: int, shard_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The shards this rank writes: every world_size-th. Items do not depend on the world size."""
    return shard_ranges(num_items, shard_size)[rank::world_size]


def shard_path(folder: str | Path, first: int) -> Path:
    return Path(folder) / f"shard_{first:08d}.safetensors"


def write_shard(folder: str | Path, first: int, key: str, tensor: torch.Tensor, prompts: Sequence[str],
                settings: dict[str, Any] | None = None) -> Path:
    """Write one shard atomically (temporary name, then rename): a killed job leaves no half shard."""
    if tensor.shape[0] != len(prompts):
        raise ValueError(f"{tensor.shape[0]} items but {len(prompts)} prompts")
    path = shard_path(folder, first)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: json.dumps(v) for k, v in (settings or {}).items()}
    metadata["prompts"] = json.dumps(list(prompts), ensure_ascii=False)
    tmp = path.with_name(path.name + ".tmp")
    save_file({key: tensor.detach().cpu().contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def placement(cfg, rank: int | None, world_size: int | None, device: torch.device | None):
    """(rank, world size, device) of a shard-writing job: given ones win, the rest come from torchrun."""
    if rank is None or world_size is None or device is None:
        from utils.distributed import init_distributed, pick_device

        dist = init_distributed()
        rank = dist.rank if rank is None else rank
        world_size = dist.world_size if world_size is None else world_size
        device = device or pick_device(cfg, dist.local_rank)
    return rank, world_size, device


def shard_script_parser(description: str, items: str, batch_help: str) -> argparse.ArgumentParser:
    """The command line every shard-writing script shares (--out, --shard-size, --batch-size, --overwrite and
    Hydra overrides of the training config); the script adds its own inputs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for shard_*.safetensors")
    p.add_argument("--shard-size", type=int, default=64, help=f"{items} per shard file")
    p.add_argument("--batch-size", type=int, default=1, help=batch_help)
    p.add_argument("--overwrite", action="store_true", help="redo shards that already exist")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (experiment=, model=, method.*)")
    return p


def fill_shards(out: str | Path, num_items: int, shard_size: int, rank: int, world_size: int, key: str,
                make: Callable[[int, int], tuple[torch.Tensor, list[str]]], settings: dict[str, Any] | None = None,
                overwrite: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Write this rank's shards; `make(start, end)` -> (tensor [n, ...], prompts) of items [start, end).

    Finished shards are kept unless `overwrite`, so a killed job resumes where it stopped, at any
    world size (a shard's contents depend on its item range only).
    """
    written = []
    mine = rank_shards(num_items, shard_size, rank, world_size)
    for k, (start, end) in enumerate(mine):
        path = shard_path(out, start)
        if path.exists() and not overwrite:
            log(f"rank {rank}: {path.name} exists, kept")
            continue
        tensor, prompts = make(start, end)
        if len(prompts):
            written.append(write_shard(out, start, key, tensor, prompts, settings))
        log(f"rank {rank}: shard {k + 1}/{len(mine)} ({path.name}, {len(prompts)} items)")
    return written


# ---------------------------------------------------------------- reading shards
class SafetensorShards(Dataset):
    """Items {"prompts": str, key: tensor} from a folder of shards, read one item at a time.

    `expect` lists what this run needs, so that shards made for another setting are refused at
    start instead of training on them: "num_frames" and "latent_shape" are checked against the
    tensor shapes, every other key against the setting recorded in the shard (when it has one).
    """

    key = ""  # the tensor of each shard
    frames_dim = 1  # the frame axis of the stored [N, ...] tensor
    made_by = ""  # the script that makes such shards, for error messages

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None):
        self.folder = Path(path).expanduser()
        name = type(self).__name__
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"{name}: {self.folder} is not a folder; expected {SHARD_GLOB} files holding {self.key!r} "
                f"(make them with {self.made_by})"
            )
        self.files = sorted(self.folder.glob(SHARD_GLOB))
        if not self.files:
            raise FileNotFoundError(f"{name}: {self.folder} holds no {SHARD_GLOB} files (make them with {self.made_by})")
        self.prompts: list[str] = []
        self.starts: list[int] = []
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                if self.key not in f.keys():
                    raise KeyError(f"{file} holds {sorted(f.keys())}, not {self.key!r}: is it a {name} shard?")
                shape = list(f.get_slice(self.key).get_shape())
                settings = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            prompts = settings.pop("prompts", None)
            if prompts is None:
                prompts = self._sidecar(file)
            if len(prompts) != shape[0]:
                raise ValueError(f"{file} holds {shape[0]} items but {len(prompts)} prompts")
            self._check(file, shape, settings, expect or {})
            self.starts.append(len(self.prompts))
            self.prompts.extend(prompts)

    def _sidecar(self, file: Path) -> list[str]:
        sidecar = file.with_suffix(".json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{file} has no 'prompts' metadata and no sidecar {sidecar.name} (a JSON list)")
        return json.loads(sidecar.read_text(encoding="utf-8"))

    def _check(self, file: Path, shape: list[int], settings: dict, expect: dict) -> None:
        found = {"num_frames": shape[self.frames_dim], "latent_shape": shape[self.frames_dim + 1:]}
        for key, wanted in expect.items():
            have = found.get(key, settings.get(key))
            if wanted is None or have is None:
                continue
            if (list(have) if isinstance(have, (list, tuple)) else have) != wanted:
                raise ValueError(
                    f"{file} was made with {key}={have}, but this run needs {key}={wanted}: make the shards "
                    f"again for this setting ({self.made_by}) or change the run's config to match"
                )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.prompts):
            raise IndexError(f"index {index} out of range for {len(self.prompts)} items in {self.folder}")
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        with safe_open(str(self.files[shard]), framework="pt") as f:
            item = f.get_slice(self.key)[row : row + 1][0]  # reads this item only
        return {"prompts": self.prompts[index], self.key: item}


class LatentShards(SafetensorShards):
    """Video latents for CausVid: items {"prompts": str, "latents": [F, C, H, W]}."""

    key = "latents"
    frames_dim = 1
    made_by = "scripts/encode_videos.py"


class ODEPairShards(SafetensorShards):
    """The teacher's ODE pairs: items {"prompts": str, "ode": [S+1, F, C, H, W]}."""

    key = "ode"
    frames_dim = 2
    made_by = "scripts/generate_ode_pairs.py"

    def _check(self, file: Path, shape: list[int], settings: dict, expect: dict) -> None:
        steps = expect.get("denoising_step_list")
        if steps is not None and shape[1] != len(steps) + 1:
            raise ValueError(
                f"{file} holds {shape[1] - 1} student-step states per item, but this run's "
                f"denoising_step_list has {len(steps)} steps; make the pairs again with {self.made_by}"
            )
        super()._check(file, shape, settings, expect)


@dataclass
class Batches:
    """Deterministic batches: the items of (step, micro-batch, rank) are a function of those alone.

    The data position is the step itself, so resuming needs no sampler state; every global batch
    is `total` consecutive indices (mod the dataset length), split across accumulation and ranks.
    """

    dataset: torch.utils.data.Dataset
    batch_size: int
    world_size: int
    accumulation: int

    def sample_ids(self, step: int, micro: int, rank: int) -> list[int]:
        per_step = self.batch_size * self.world_size * self.accumulation
        first = step * per_step + (micro * self.world_size + rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def get(self, step: int, micro: int, rank: int) -> tuple[list[int], dict]:
        ids = self.sample_ids(step, micro, rank)
        items = [self.dataset[i % len(self.dataset)] for i in ids]
        if isinstance(items[0], str):
            return ids, {"prompts": items}
        # dict items: prompts as a list, every tensor ("video", "latents", "ode") stacked on a batch axis
        batch = {"prompts": [it["prompts"] for it in items]}
        for key in items[0]:
            if key != "prompts":
                batch[key] = torch.stack([it[key] for it in items])
        return ids, batch
