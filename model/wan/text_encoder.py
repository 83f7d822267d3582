"""Wan's text encoder: transformers' UMT5 encoder, frozen, with Wan's zero padding past each prompt.

Numerically the same as diffusers' `WanPipeline._get_t5_prompt_embeds` (and the original Wan
`T5EncoderModel`): pad/truncate to `text_len` tokens with `</s>` appended, run the encoder with the
attention mask, keep each prompt's own tokens and zero the rest. The DiT's cross-attention has no
mask, so the padding must be zeros, not whatever UMT5 produces at padded positions.
"""

from __future__ import annotations

import html
import re

import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from .folder import check_wan_folder
from .weights import raise_on_mismatch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean` without ftfy (which it also skips when ftfy is not installed)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class WanTextEncoder(torch.nn.Module):
    """forward(prompts) -> {"prompt_embeds": [B, text_len, d_model], "attention_mask": [B, text_len] bool}.

    Embeddings come in the encoder's dtype (bf16 for Wan, as the original Wan feeds its DiT).
    """

    def __init__(self, path: str, text_len: int = 512, dtype="bfloat16", device=None):
        super().__init__()
        folder = check_wan_folder(path, parts=("text_encoder", "tokenizer"))
        self.text_len = text_len
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        model, info = UMT5EncoderModel.from_pretrained(
            folder / "text_encoder", dtype=to_dtype(dtype), output_loading_info=True
        )
        # transformers only warns about missing weights and leaves them random: refuse instead.
        raise_on_mismatch(
            sorted(info["missing_keys"]), [], sorted(str(m) for m in info["mismatched_keys"]),
            f"{folder / 'text_encoder'} does not match UMT5EncoderModel",
        )
        self.model = model.requires_grad_(False).eval()
        self.text_dim = model.config.d_model
        if device is not None:
            self.to(device)

    def train(self, mode: bool = True):
        # Frozen: UMT5 has dropout, so a parent's .train() must not switch it on.
        return super().train(False)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("WanTextEncoder takes a list of prompts, not a single string")
        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.model.device
        # Wan keeps the first seq_len positions of each prompt (right padding), so mask by position.
        seq_lens = tokens.attention_mask.gt(0).sum(dim=1).to(device)
        mask = torch.arange(self.text_len, device=device)[None, :] < seq_lens[:, None]
        embeds = self.model(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        embeds = torch.where(mask[..., None], embeds, torch.zeros((), dtype=embeds.dtype, device=device))
        return {"prompt_embeds": embeds, "attention_mask": mask}
