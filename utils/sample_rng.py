"""Random draws keyed by sample: one generator per sample of the global batch.

A sample's noise depends on (seed, step, phase, its global index) only, so the same global batch
gives the same draws whether it runs as one batch, as micro-batches of gradient accumulation, or
spread over any number of ranks; and a resumed run replays them.
"""

from __future__ import annotations

import hashlib

import torch


def mix_seed(*values) -> int:
    """A 63-bit seed from any tuple of ints / strings, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleRNG:
    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.device = torch.device(device)

    @classmethod
    def for_samples(cls, seed: int, step: int, phase: str, sample_ids: list[int], device="cpu") -> "SampleRNG":
        return cls([mix_seed(seed, step, phase, i) for i in sample_ids], device)

    def __len__(self) -> int:
        return len(self.generators)

    def _check(self, batch: int) -> None:
        if batch != len(self.generators):
            raise ValueError(f"a draw for a batch of {batch} from a SampleRNG of {len(self.generators)} samples")

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        """[B, ...] standard normal, row b from sample b's stream."""
        self._check(shape[0])
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.dtype)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        """[B, ...] integers in [low, high), row b from sample b's stream."""
        self._check(shape[0])
        return torch.stack([torch.randint(low, high, shape[1:], generator=g, device=self.device) for g in self.generators])
