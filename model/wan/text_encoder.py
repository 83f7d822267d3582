"""Wan's text encoder: transformers' UMT5 encoder, frozen, with Wan's zero padding past each prompt.

Numerically the same as diffusers' `WanPipeline._get_t5_prompt_embeds` (and the original Wan
`T5EncoderModel`): pad/truncate to `text_len` tokens with `</s>` appended, run the encoder with the
attention mask, keep each prompt's own tokens and zero the rest. The DiT's cross-attention has no
mask, so the padding must be zeros, not whatever UMT5 produces at padded positions.

A prompt longer than `text_len` tokens is truncated, as the reference does (diffusers' WanPipeline
truncates to max_sequence_length=512 without a word; so does the original Wan): the model was
trained on at most 512 tokens and refusing would break prompt files that worked there. Unlike the
reference, the encoder says so, once: the first over-long prompt it meets is named (its first words,
token count and the limit) in one warning; `check_prompts` names every over-long prompt of a list
up front (inference calls it before generating).
"""

from __future__ import annotations

import html
import logging
import re

import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from .folder import check_wan_folder
from .weights import raise_on_mismatch

log = logging.getLogger(__name__)

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


def first_words(prompt: str, words: int = 6) -> str:
    """The prompt's first words, quoted, for messages that must not echo a long prompt whole."""
    split = prompt.split()
    return repr(" ".join(split[:words]) + (" ..." if len(split) > words else ""))


def _empty_umt5(folder, dtype: torch.dtype) -> UMT5EncoderModel:
    """UMT5 built from its config with parameters on the meta device, in from_pretrained's dtypes: `dtype`,
    except the modules transformers keeps in float32 (`_keep_in_fp32_modules`, T5's `wo`, for float16 only;
    `_keep_in_fp32_modules_strict` for bfloat16 too), matched as it matches them (a search in the name).
    tests/test_sharded_loading.py checks the dtypes against from_pretrained's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(AutoConfig.from_pretrained(folder))
    model.tie_weights()  # init_empty_weights re-registers each module's parameters, untying shared / embed_tokens
    model.to(dtype)
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype == torch.bfloat16 else []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or []) + \
            list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if keep:
        pattern = re.compile("|".join(re.escape(k) for k in keep))
        for name, p in model.named_parameters():
            if pattern.search(name):
                p.data = p.data.float()
    return model


class WanTextEncoder(torch.nn.Module):
    """forward(prompts) -> {"prompt_embeds": [B, text_len, d_model], "attention_mask": [B, text_len] bool}.

    Embeddings come in the encoder's dtype (bf16 for Wan, as the original Wan feeds its DiT).
    """

    def __init__(self, path: str, text_len: int = 512, dtype="bfloat16", device=None, load: bool = True):
        """load=False: UMT5's parameters on the meta device, in the dtypes from_pretrained would give them;
        the engine shards it and fills each rank's shards from `weight_tensors()` (engine/build.py)."""
        super().__init__()
        folder = check_wan_folder(path, parts=("text_encoder", "tokenizer"))
        self.folder, self.text_len = folder, text_len
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        if load:
            model, info = UMT5EncoderModel.from_pretrained(
                folder / "text_encoder", dtype=to_dtype(dtype), output_loading_info=True
            )
            # transformers only warns about missing weights and leaves them random: refuse instead.
            raise_on_mismatch(
                sorted(info["missing_keys"]), [], sorted(str(m) for m in info["mismatched_keys"]),
                f"{folder / 'text_encoder'} does not match UMT5EncoderModel",
            )
        else:
            model = _empty_umt5(folder / "text_encoder", to_dtype(dtype))
        self.model = model.requires_grad_(False).eval()
        self.text_dim = model.config.d_model
        self.warned = False  # an over-long prompt has been reported: later ones are truncated quietly
        if device is not None:
            self.to(device)

    def weight_tensors(self) -> dict:
        """The text encoder's tensors in this module's state-dict names (`model.` + UMT5's), read lazily:
        safetensors files opened, .bin files memory-mapped (model/wan/weights.py)."""
        from .weights import open_safetensors

        folder = self.folder / "text_encoder"
        files = sorted(folder.glob("model*.safetensors"))
        tensors = {}
        for f in files or sorted(folder.glob("pytorch_model*.bin")):
            part = open_safetensors(f) if f.suffix == ".safetensors" else \
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            tensors.update({f"model.{k}": v for k, v in part.items()})
        return tensors

    def token_count(self, prompt: str) -> int:
        """Tokens of `prompt` with `</s>`, untruncated: more than text_len means it will be truncated."""
        return len(self.tokenizer(prompt_clean(prompt), add_special_tokens=True, verbose=False).input_ids)

    def check_prompts(self, prompts: list[str]) -> None:
        """One warning naming every over-long prompt (index in `prompts`, first words, tokens) and the limit."""
        seen, long = set(), []
        for i, prompt in enumerate(prompts):
            if prompt not in seen:
                seen.add(prompt)
                if (n := self.token_count(prompt)) > self.text_len:
                    long.append(f"prompt {i} {first_words(prompt)} ({n} tokens)")
        if long:
            shown = "; ".join(long[:3]) + (f"; and {len(long) - 3} more" if len(long) > 3 else "")
            log.warning("%d prompt(s) are longer than text_len=%d tokens and are truncated to it, as Wan's "
                        "reference pipeline does: %s", len(long), self.text_len, shown)
            self.warned = True

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
        if not self.warned and tokens.attention_mask[:, -1].any():  # a prompt filled text_len: maybe truncated
            self._warn_truncated(prompts)
        device = self.model.device
        # Wan keeps the first seq_len positions of each prompt (right padding), so mask by position.
        seq_lens = tokens.attention_mask.gt(0).sum(dim=1).to(device)
        mask = torch.arange(self.text_len, device=device)[None, :] < seq_lens[:, None]
        embeds = self.model(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        embeds = torch.where(mask[..., None], embeds, torch.zeros((), dtype=embeds.dtype, device=device))
        return {"prompt_embeds": embeds, "attention_mask": mask}

    def _warn_truncated(self, prompts: list[str]) -> None:
        for prompt in prompts:
            if (n := self.token_count(prompt)) > self.text_len:
                log.warning("prompt %s has %d tokens, more than text_len=%d: truncated to %d, as Wan's reference "
                            "pipeline does (warned once; later over-long prompts are truncated too)",
                            first_words(prompt), n, self.text_len, self.text_len)
                self.warned = True
                return
