"""A realism classifier on a Wan network's hidden states: the discriminator head of DMD2's GAN term.

DMD2 (Yin et al., 2024, arXiv 2405.14867, Sec. 4.3) puts a small classification branch on the fake
score's bottleneck, so the discriminator shares the critic's features of a noised clip. A DiT has no
bottleneck; the Self-Forcing reference instead reads the hidden states of a few chosen blocks of the
fake score, each summarised by one learned register token that cross-attends to that block's tokens,
and classifies the concatenated summaries with an MLP. Both summaries are here:

- "registers": per chosen block, a learned token (RMS-normed) cross-attends to the block's
  LayerNorm'd tokens, then a residual feed-forward; cost O(tokens) per block, no token-token attention.
- "pool": per chosen block, the mean over its tokens, LayerNorm'd (cheapest; DMD2-like global pooling).

forward(features: list of [B, L, D] hidden states (L = frames x tokens per frame), in the order of `blocks`) -> logits [B] (one
realism logit per clip; D(x) > 0: real). The head does not call the backbone: the method does,
with `net(x_t, t, context, features=blocks)` (model/wan/transformer.py), so the same head also serves
other feature sources (e.g. a frozen teacher's, as DCM's detail expert uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DESIGNS = ("registers", "pool")


def default_blocks(depth: int) -> list[int]:
    """Three blocks from the middle to the last, as the Self-Forcing reference picks for Wan-1.3B's 30
    ([13, 21, 29]), scaled to `depth`; fewer when the network is shallower."""
    return sorted({max(0, round(depth * 14 / 30) - 1), max(0, round(depth * 22 / 30) - 1), depth - 1})


class RegisterSummary(nn.Module):
    """One learned token that cross-attends to a block's tokens, then a residual feed-forward."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the discriminator's attention heads ({heads}) must divide the feature width {dim}")
        self.heads = heads
        self.token = nn.Parameter(torch.randn(dim) * 0.02)
        self.token_norm = nn.RMSNorm(dim, eps=eps)
        self.kv_norm = nn.LayerNorm(dim, eps=eps)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, L, D] -> [B, D]
        b, _, d = tokens.shape
        split = lambda x: x.unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2)  # noqa: E731 [B, H, L, d/H]
        query = self.token_norm(self.token).expand(b, 1, d)
        kv = self.kv_norm(tokens)
        attended = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(kv)), split(self.v(kv)))
        x = query + self.o(attended.transpose(1, 2).flatten(2))
        return (x + self.ffn(self.ffn_norm(x)))[:, 0]


class DiscriminatorHead(nn.Module):
    """Realism logits from hidden states of `num_features` blocks of width `dim` (see the module doc)."""

    def __init__(self, dim: int, num_features: int, design: str = "registers", width: int | None = None,
                 heads: int = 1, eps: float = 1e-6):
        super().__init__()
        if design not in DESIGNS:
            raise ValueError(f"discriminator head design {design!r}: expected one of {DESIGNS}")
        width = width or dim
        self.design, self.dim, self.num_features = design, dim, num_features
        if design == "registers":
            self.summaries = nn.ModuleList(RegisterSummary(dim, heads, eps) for _ in range(num_features))
        else:
            self.summaries = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in range(num_features))
        self.classifier = nn.Sequential(nn.LayerNorm(num_features * dim, eps=eps), nn.Linear(num_features * dim, width),
                                        nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # features: num_features x [B, L, D] -> logits [B]
        if len(features) != self.num_features:
            raise ValueError(f"the head reads {self.num_features} feature maps, got {len(features)}")
        dtype = self.classifier[1].weight.dtype
        parts = []
        for summary, feature in zip(self.summaries, features):
            tokens = feature.to(dtype)
            parts.append(summary(tokens) if self.design == "registers" else summary(tokens.mean(dim=1)))
        return self.classifier(torch.cat(parts, dim=-1)).sum(dim=-1).float()  # [B, 1] -> [B], not a view
