"""The element-wise stretches of a Wan block (norms, modulation, RoPE, gated residuals) as functions.

Between its matrix products a Wan block runs about thirty element-wise passes over the tokens, most
of them in float32 (diffusers' FP32LayerNorm, float32 modulation and RoPE). Each function here is
one such stretch, written with exactly the ops (and op order) of diffusers' block, so the eager
versions give the block's numbers bit for bit. `block_ops(fused=True)` returns the same functions
through `torch.compile`, which turns each stretch into one or two generated kernels: the tokens are
read and written once instead of once per op. The KV cache and attention stay outside, so the
compiled graphs have fixed shapes per chunk size and never see cache bookkeeping.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (Wan's layout). x: [B, L, H, D]; cos, sin: [L, 1, D/2] float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm with a weight and no bias (Wan's q/k norm across heads)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """FP32LayerNorm without affine, then adaLN modulation. x: [B, F, T, D]; scale, shift: [B, F, 1, D] fp32."""
    return (F.layer_norm(x.float(), (x.shape[-1],), None, None, eps) * (1 + scale) + shift).type_as(x)


def qk_norm_rope(q, k, q_weight, k_weight, eps: float, heads: int, cos, sin):
    """Self-attention q and k: RMSNorm across heads, split heads, RoPE. q, k: [B, L, H*D] -> [B, L, H, D]."""
    q = rms_norm(q, q_weight, eps).unflatten(2, (heads, -1))
    k = rms_norm(k, k_weight, eps).unflatten(2, (heads, -1))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def gated_add(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + h * gate in float32, back to x's dtype. x, h: [B, F, T, D]; gate: [B, F, 1, D] fp32."""
    return (x.float() + h.float() * gate).type_as(x)


def gated_add_out(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`gated_add` for the block's output: x [B, F*T, D] (flat tokens), h [B, F, T, D], gate [B, F, 1, D]
    fp32 -> [B, F*T, D], the same numbers. The result is a new tensor, not a view: FSDP2 warns about a
    block returning a view (an in-place op on it would skip the block's pre-backward hook)."""
    return (x.float() + (h.float() * gate).flatten(1, 2)).type_as(x)


def gated_add_norm(x, h, gate, weight, bias, eps: float):
    """The self-attention residual, then the cross-attention's FP32LayerNorm (with affine) of the sum."""
    x = gated_add(x, h, gate)
    return x, F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).type_as(x)


def add_norm_modulate(x, h, scale, shift, eps: float):
    """The cross-attention residual, then the feed-forward's modulated norm of the sum."""
    x = x + h
    return x, norm_modulate(x, scale, shift, eps)


def feed_forward(ffn: torch.nn.Module, h: torch.Tensor, fused: bool) -> torch.Tensor:
    """diffusers' FeedForward (Linear, GELU(tanh), Linear). With `fused`, on CUDA and without grad, the first
    product's bias and GELU run in cuBLASLt's epilogue (`torch._addmm_activation`, whose CUDA GELU is
    the tanh form): one pass less over the 8960-wide hidden tokens (docs/performance.md). It has no
    backward, and on the CPU it computes the erf GELU, so training, CPU runs and autocast keep the
    module's own ops."""
    up = ffn.net[0]
    # a LoRA-adapted projection (peft's layer, not an nn.Linear) must run its own forward: its .weight is the base's;
    # so must a quantised one (torchao's int8 / fp8 weight, a tensor subclass: engine/quantize.py)
    if not (fused and h.is_cuda and len(ffn.net) == 3 and type(up.proj) is torch.nn.Linear
            and type(up.proj.weight) in (torch.Tensor, torch.nn.Parameter)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled()
            and getattr(up, "approximate", None) == "tanh" and up.proj.bias is not None
            and h.dtype == up.proj.weight.dtype and not (ffn.training and ffn.net[1].p > 0)):
        return ffn(h)
    hidden = torch._addmm_activation(up.proj.bias, h.reshape(-1, h.shape[-1]), up.proj.weight.t(), use_gelu=True)
    return ffn.net[2](hidden).view(*h.shape[:-1], -1)


_OPS = ("rms_norm", "norm_modulate", "qk_norm_rope", "gated_add", "gated_add_out", "gated_add_norm", "add_norm_modulate")


@functools.cache
def block_ops(fused: bool) -> SimpleNamespace:
    """The block's element-wise functions: eager (`fused=False`) or each through torch.compile."""
    table = {name: globals()[name] for name in _OPS}
    if fused:
        # dynamic=False: one graph per token count (a chunk size), the shapes a rollout repeats.
        table = {name: torch.compile(fn, dynamic=False, fullgraph=True) for name, fn in table.items()}
    return SimpleNamespace(**table)
