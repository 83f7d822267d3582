"""Tiny random Wan transformers for tests: the real diffusers class at a few thousand parameters."""

import torch
from diffusers import WanTransformer3DModel

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (norm gains near 1), so no path is trivially zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def tiny_diffusers(seed: int = 0, **overrides) -> WanTransformer3DModel:
    return randomize(WanTransformer3DModel(**{**TINY, **overrides}), seed).eval()
