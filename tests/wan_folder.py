"""A tiny random Wan2.1 folder in diffusers format (transformer, vae, text_encoder, tokenizer).

Real classes at toy sizes, written to disk the way Wan-AI/Wan2.1-T2V-1.3B-Diffusers is, so the
loaders are tested on the same layout; the tokenizer is built offline with `tokenizers`. Other test
modules use it with `from tests.wan_folder import tiny_wan_folder` (a session-scoped fixture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from tests.wan_tiny import randomize

# T5's special ids: <pad> 0, </s> 1 (appended to every prompt), <unk> 2.
WORDS = ("a an the red green blue yellow white black circle square triangle cat dog car "
         "moving left right up down slowly quickly in on at sunset street forest of with and").split()
VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}

Z_DIM = 4
TEXT_DIM = 16
VAE = dict(
    base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True],
    # Non-trivial statistics, so a swapped mean / std or a missing normalisation shows.
    latents_mean=[0.3, -0.7, 1.1, -0.2], latents_std=[1.7, 0.6, 2.3, 1.2],
)
UMT5 = dict(
    vocab_size=len(VOCAB), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,  # dropout_rate stays 0.1: eval must matter
)
TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=Z_DIM, out_channels=Z_DIM,
    text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _randomize_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm gains away from 1 (the default init would hide a skipped or misplaced norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def make_tiny_wan_folder(root: Path) -> Path:
    """Write the tiny folder under `root` and return it (about 1 MB, well under a second)."""
    root = Path(root)
    torch.manual_seed(0)  # the default inits of the VAE and UMT5 draw from the global generator
    _tokenizer().save_pretrained(root / "tokenizer")
    _randomize_norms(UMT5EncoderModel(UMT5Config(**UMT5)), 1).save_pretrained(root / "text_encoder")
    _randomize_norms(AutoencoderKLWan(**VAE), 2).save_pretrained(root / "vae")
    randomize(WanTransformer3DModel(**TRANSFORMER), 3).save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="session")
def tiny_wan_folder(tmp_path_factory) -> Path:
    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")
