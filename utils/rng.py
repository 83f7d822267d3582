"""Seeding and RNG state.

Noise that matters for reproducibility is drawn from generators reseeded from (seed, rank, step),
as EDM2 does, so a resumed run replays the same draws without having to restore any generator
state, and ranks differ. The global RNG states (dropout, library code that uses the default
generator) are also saved and restored per rank so that resume is bit-exact on the same world size.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from utils.sample_rng import mix_seed

# Domain tags keep the three derived seeds of one (seed, rank, step) independent of each other.
_PROCESS, _PER_RANK_STEP, _SHARED_STEP = 0, 1, 2


def _mix(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (the project's one seed mixer)."""
    if any(v < 0 for v in values):
        raise ValueError(f"seeds, ranks and steps must be non-negative, got {values}")
    return mix_seed(*values)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) differently on each rank."""
    s = _mix(_PROCESS, seed, rank)
    random.seed(s)
    np.random.seed(s % (1 << 32))  # legacy numpy accepts 32-bit seeds only
    torch.manual_seed(s)  # also seeds all CUDA devices


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for this rank at this step: differs across ranks, replays after resume."""
    return torch.Generator(device=device).manual_seed(_mix(_PER_RANK_STEP, seed, rank, step))


def shared_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The same generator on every rank, for choices all ranks must agree on without a broadcast."""
    return torch.Generator(device=device).manual_seed(_mix(_SHARED_STEP, seed, step))


def get_rng_state() -> dict:
    """Global RNG states as tensors, ints and lists, so torch.load(weights_only=True) reads them."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Restore the devices both runs have; a resume on a node with fewer or more GPUs keeps
        # the freshly seeded state of the others (their draws then differ, which is unavoidable).
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
