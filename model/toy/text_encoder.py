"""A small, deterministic text encoder for the toy world's grammar (in place of UMT5)."""

import torch

from model.toy.world import VOCABULARY


class ToyTextEncoder(torch.nn.Module):
    """Embeds each word of a prompt as a fixed vector; the same output shape contract as UMT5.

    Word vectors are orthonormal rows (QR of a seeded Gaussian matrix) scaled to norm
    sqrt(text_dim), so entries have unit scale like a normalised embedding and any two prompts
    differ by at least sqrt(2) in some entry: the exact teacher can decode the prompt from the
    embeddings even after a bf16 round trip. The empty prompt "" embeds to all zeros, the
    unconditional (negative) prompt for classifier-free guidance.
    """

    def __init__(self, text_len: int = 8, text_dim: int = 32, seed: int = 0):
        super().__init__()
        if text_dim < len(VOCABULARY):
            raise ValueError(f"text_dim={text_dim} is too small for orthogonal embeddings of the "
                             f"{len(VOCABULARY)}-word toy vocabulary; use text_dim >= {len(VOCABULARY)}")
        self.text_len, self.text_dim = text_len, text_dim
        self.vocabulary = VOCABULARY
        self._ids = {w: i for i, w in enumerate(VOCABULARY)}
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(text_dim, text_dim, generator=g, dtype=torch.float64))
        table = q[:len(VOCABULARY)] * text_dim ** 0.5
        # Not persistent: the table is a function of (text_dim, seed), not a weight to checkpoint.
        self.register_buffer("table", table.float(), persistent=False)

    def tokenize(self, prompt: str, name: str = "prompt") -> list[int]:
        """Word ids; an over-long prompt or an unknown word is an error naming the prompt by its first
        words (`name`: how to call it, e.g. "prompt 3"), never echoing a long prompt whole."""
        words = prompt.lower().split()
        start = repr(" ".join(words[:6]) + (" ..." if len(words) > 6 else ""))
        if len(words) > self.text_len:  # no truncation: the exact teacher would score a different prompt
            raise ValueError(f"{name} {start} has {len(words)} words, more than the text encoder's "
                             f"text_len={self.text_len}; shorten it or raise model.text_encoder.text_len")
        for word in words:
            if word not in self._ids:
                raise ValueError(f"unknown word {word!r} in {name} {start}; the toy text "
                                 f"encoder knows only: {', '.join(self.vocabulary)}")
        return [self._ids[w] for w in words]

    def check_prompts(self, prompts: list[str]) -> None:
        """Every prompt of a list tokenizes, or an error naming the first bad one by its index."""
        seen = set()
        for i, prompt in enumerate(prompts):
            if prompt not in seen:
                seen.add(prompt)
                self.tokenize(prompt, f"prompt {i}")

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """-> prompt_embeds [B, L, D] float32 (zeros past each prompt) and attention_mask [B, L]."""
        if isinstance(prompts, str):
            raise TypeError("ToyTextEncoder takes a list of prompts, not a single string")
        embeds = self.table.new_zeros(len(prompts), self.text_len, self.text_dim)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool, device=self.table.device)
        for b, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            embeds[b, :len(ids)] = self.table[ids]
            mask[b, :len(ids)] = True
        return {"prompt_embeds": embeds, "attention_mask": mask}
