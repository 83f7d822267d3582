"""Exponential moving average of a model's parameters, shard-local under FSDP2.

Keys are `state_dict()` names: `named_parameters()` keeps the prefixes that activation
checkpointing and torch.compile insert, `state_dict()` strips them, and the EMA has to load into
(and export as) the plain model. Under `fully_shard` each parameter is a DTensor; the EMA keeps
fp32 copies of the local shards only, so it costs 4 bytes per local parameter and no
communication. `state_dict()` wraps the shards back into DTensors so DCP saves and reshards them
like the model itself. Only trained parameters are averaged (`named_params`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from utils.fsdp import reshard

# Module wrappers that add a path component to parameter names but not to state_dict keys.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def named_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The trained parameters: frozen ones (a LoRA network's base weights) never change, so an average
    of them would be a second copy of the model for nothing."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield clean_name(name), p


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.step = -1  # the last step folded in; -1 = never
        self.active = False
        # Allocated now (not at start_step) so state_dict() has its final shapes from the start,
        # which DCP needs to load into it.
        self.shadow: dict[str, torch.Tensor] = {}
        self._dtensor_meta: dict[str, tuple] = {}
        with torch.no_grad():
            for name, p in named_params(model):
                self.shadow[name] = _local(p).detach().to(torch.float32, copy=True)
                if isinstance(p, DTensor):
                    self._dtensor_meta[name] = (p.device_mesh, p.placements, p.shape, p.stride())

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        # By name among all parameters: a method may freeze some of those it trained when the EMA was built
        # (DCM's detail stage freezes the semantic expert); they stay averaged (they no longer change).
        params = {clean_name(name): p for name, p in model.named_parameters()}
        missing = sorted(self.shadow.keys() - params.keys())[:5]
        extra = sorted(k for k, p in params.items() if p.requires_grad and k not in self.shadow)[:5]
        if missing or extra:
            raise KeyError(f"model parameters do not match the EMA: missing {missing}, unexpected {extra}")
        locals_ = [_local(params[name]) for name in self.shadow]
        for name, t in zip(self.shadow, locals_):
            if t.shape != self.shadow[name].shape:
                raise ValueError(
                    f"{name}: local shape {tuple(t.shape)} != EMA shape {tuple(self.shadow[name].shape)}; "
                    "the model must be sharded the same way as when the EMA was built"
                )
        return locals_

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step `step` (a no-op before start_step)."""
        if step < self.start_step:
            return
        params = self._params(model)
        shadows = list(self.shadow.values())
        if not self.active:
            torch._foreach_copy_(shadows, params)
            self.active = True
        else:
            # ema + (1 - decay) * (p - ema) == decay * ema + (1 - decay) * p
            torch._foreach_lerp_(shadows, [p.float() for p in params], 1.0 - self.decay)
        self.step = step

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into a model with the same names and sharding (e.g. for eval)."""
        torch._foreach_copy_(self._params(model), list(self.shadow.values()))

    def _wrap(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in self._dtensor_meta:
            return t
        mesh, placements, shape, stride = self._dtensor_meta[name]
        return DTensor.from_local(t, mesh, placements, shape=shape, stride=stride, run_check=False)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "step": self.step,
            "active": self.active,
            "shadow": {name: self._wrap(name, t) for name, t in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())[:5]
            extra = sorted(shadow.keys() - self.shadow.keys())[:5]
            raise KeyError(f"EMA state does not match the model: missing {missing}, unexpected {extra}")
        for name, t in shadow.items():
            self.shadow[name].copy_(_local(t))
        # decay and start_step come from the config of the resumed run, so they can be changed
        # on resume; step and active are the run's history.
        self.step = int(state["step"])
        self.active = bool(state["active"])

    @torch.no_grad()
    def full_state_dict(self, dtype: torch.dtype | None = None, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Whole (gathered) EMA tensors for export; a collective under FSDP: call on every rank.

        rank0_only: gather one tensor at a time and keep it, on the CPU, on rank 0 only (other ranks get
        {}), so no rank ever holds the whole model on its GPU.
        """
        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        out = {}
        for name, t in self.shadow.items():
            full = self._wrap(name, t).full_tensor() if name in self._dtensor_meta else t.clone()
            if keep:
                full = full.to(dtype) if dtype is not None else full
                out[name] = full.cpu() if rank0_only else full
        return out

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Sample with the EMA weights inside the block: swap them into the model's (local shards of)
        parameters, and the training weights back afterwards; no full copy of the model is made."""
        reshard(model)  # gathered weights would hide the swap from the next forward
        params = self._params(model)
        with torch.no_grad():
            backup = [p.clone() for p in params]
            torch._foreach_copy_(params, list(self.shadow.values()))
        try:
            yield model
        finally:
            reshard(model)
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
