"""DCM's generator network (model/dcm.py): a Wan DiT holding a semantic and a detail expert, routed by timestep.

A network, not a method: inference builds it for a DCM export (SelfForcingModel.inference_generator) and runs
it as any Wan DiT, so nothing outside model/dcm.py needs to know about DCM.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from model.wan.transformer import WanDiT
from model.wan.weights import check_keys, load_strict

EXPERTS = ("semantic", "detail")
# Both experts share the text's cross-attention keys and values (the rollout computes them once per prompt),
# so the detail LoRA leaves attn2.to_k / attn2.to_v alone.
DETAIL_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"]
SHARED = ("attn2.to_k", "attn2.to_v")


def is_detail(name: str) -> bool:
    """A parameter (or state-dict key) of the detail expert alone: its LoRA or its copies."""
    return ".lora_" in name or name.startswith("detail.")


class DualExpertDiT(WanDiT):
    """A Wan DiT holding DCM's two experts; its forward picks the expert by timestep.

    The semantic expert is the DiT itself. The detail expert is the same DiT with a peft LoRA on the attention
    (`targets`) and its own copies of the time embedding (`detail.time_embedder`, `detail.time_proj`) and of the
    output projection (`detail.proj_out`; the output norm has no weights). forward(x, t, ctx, expert=None) routes
    each sample and frame with t <= boundary_timestep to the detail expert, the others to the semantic expert,
    with tensor ops only (no host sync; a CUDA graph captured at one step replays correctly at every other):
    the LoRA's input is gated per token, and the copies' outputs are selected with torch.where. `expert=`
    forces one expert for the whole call (training); "semantic" then skips the LoRA altogether.

    The routing state is set by forward and read by hooks on the submodules, so that the rest of the
    forward is WanDiT's; it stays until the next forward, which a checkpointed block's recompute in the
    backward relies on.
    """

    def add_detail_expert(self, boundary_timestep: float, detail) -> "DualExpertDiT":
        """The detail expert on top of this DiT's weights: `detail` has rank, alpha, targets and dropout (DCM's
        method.detail); the LoRA is peft's, injected in place."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer, LoraModel

        modules = dict(self.named_modules())
        for target in detail.targets:
            found = [n for n in modules if n == target or n.endswith("." + target)]
            if not found or not all(isinstance(modules[n], nn.Linear) for n in found):
                raise ValueError(f"method.detail.targets: {target!r} names {'no module' if not found else 'a non-linear module'} "
                                 f"of the Wan DiT; its blocks' attention layers are attn1/attn2.to_q, to_k, to_v, to_out.0")
            shared = [n for n in found if n.endswith(SHARED)]
            if shared:
                raise ValueError(f"method.detail.targets: {target!r} reaches {shared[0]}, the cross-attention's keys or "
                                 f"values of the text, which both experts share (computed once per prompt); use "
                                 f"{DETAIL_TARGETS}")
        # rounded to float32, as the timesteps the rollout passes: a step at the boundary compares equal to it
        self.boundary_timestep = float(torch.tensor(boundary_timestep, dtype=torch.float32))
        embedder = self.condition_embedder
        self.detail = nn.ModuleDict({"time_embedder": copy.deepcopy(embedder.time_embedder),
                                     "time_proj": copy.deepcopy(embedder.time_proj),
                                     "proj_out": copy.deepcopy(self.proj_out)})
        LoraModel(self, LoraConfig(r=detail.rank, lora_alpha=detail.alpha, target_modules=list(detail.targets),
                                   lora_dropout=detail.dropout), "default")  # injected in place (peft)
        self.lora_layers = [m for m in self.modules() if isinstance(m, LoraLayer)]
        for layer in self.lora_layers:
            layer.lora_A["default"].register_forward_pre_hook(self._gate_lora)
        embedder.time_embedder.register_forward_hook(self._route_time_embedder)
        embedder.time_proj.register_forward_hook(self._route_time_proj)
        self.proj_out.register_forward_hook(self._route_proj_out)
        self._expert, self._mask, self._gate, self._lora_off = "mixed", None, None, False
        return self

    # ------------------------------------------------------------------ routing
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *, expert: str | None = None,
                **kwargs):
        # x: [B, F, C, H, W]; timestep: [B, F] or [B]
        if expert is None:
            t = timestep if timestep.ndim == 2 else timestep[:, None].expand(x.shape[0], x.shape[1])
            self._mask = t.float() <= self.boundary_timestep  # [B, F]: the detail expert's samples and frames
            _, p_h, p_w = self.config.patch_size
            tokens = (x.shape[-2] // p_h) * (x.shape[-1] // p_w)
            self._gate = self._mask.repeat_interleave(tokens, dim=1)[..., None]  # [B, F*T, 1], frame-major tokens
            self._expert = "mixed"
        elif expert in EXPERTS:
            self._expert, self._mask, self._gate = expert, None, None
        else:
            raise ValueError(f"expert={expert!r}: expected one of {EXPERTS} or None (by timestep)")
        lora_off = self._expert == "semantic"
        if lora_off != self._lora_off:
            for layer in self.lora_layers:
                # peft's flag that skips the adapter (its enable_adapters() would also flip requires_grad,
                # which the training stages own)
                layer._disable_adapters = lora_off
            self._lora_off = lora_off
        return super().forward(x, timestep, context, **kwargs)

    def _gate_lora(self, module, args):
        if self._expert != "mixed":
            return None
        return (args[0] * self._gate.to(args[0].dtype),)

    def _select(self, detail: nn.Module, args, out: torch.Tensor) -> torch.Tensor | None:
        # out: [B, F, ...] of the semantic module; the detail copy on the same input, per sample and frame
        if self._expert == "semantic":
            return None
        mine = detail(*args)
        if self._expert == "detail":
            return mine
        return torch.where(self._mask.view(*self._mask.shape, *[1] * (out.ndim - 2)), mine, out)

    def _route_time_embedder(self, module, args, out):
        return self._select(self.detail["time_embedder"], args, out)

    def _route_time_proj(self, module, args, out):
        return self._select(self.detail["time_proj"], args, out)

    def _route_proj_out(self, module, args, out):
        return self._select(self.detail["proj_out"], args, out)

    # ------------------------------------------------------------------ weights
    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """A DCM generator's own weights (both experts), or a plain Wan transformer's: the semantic expert,
        the detail expert then starting as it (its copies from those weights, its LoRA at peft's init, B = 0)."""
        own = self.state_dict()
        if set(state_dict) == set(own):
            load_strict(self, state_dict, source)
            return
        base = {k.replace(".base_layer.", "."): k for k in own if not is_detail(k)}
        renamed = {base.get(k, k): v for k, v in state_dict.items()}
        check_keys(self, renamed | {k: v for k, v in own.items() if is_detail(k)}, source)  # names and shapes
        self.load_state_dict(renamed, strict=False)
        self.reset_detail_copies()

    @torch.no_grad()
    def reset_detail_copies(self) -> None:
        """The detail expert's copies := the semantic expert's modules."""
        embedder = self.condition_embedder
        for name, module in (("time_embedder", embedder.time_embedder), ("time_proj", embedder.time_proj),
                             ("proj_out", self.proj_out)):
            self.detail[name].load_state_dict(module.state_dict())

    def semantic_state_dict(self) -> dict[str, torch.Tensor]:
        """The semantic expert as a plain Wan transformer's state dict (peft's base_layer names undone)."""
        return {k.replace(".base_layer.", "."): v for k, v in self.state_dict().items() if not is_detail(k)}


def adapter_parts(weights: dict[str, torch.Tensor], detail) -> dict:
    """The detail LoRA of a DualExpertDiT state dict as a peft adapter file: names without the adapter name
    (`blocks.0.attn1.to_q.lora_A.weight`) and its adapter_config.json (PeftModel.save_pretrained's files)."""
    from peft import LoraConfig

    adapter = {k.replace(".default.", "."): v for k, v in weights.items() if ".lora_" in k}
    config = LoraConfig(r=detail.rank, lora_alpha=detail.alpha, target_modules=list(detail.targets),
                        lora_dropout=detail.dropout).to_dict()
    return {"adapter": adapter, "adapter_config": {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}}
