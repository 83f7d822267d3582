"""Write a diffusers-format Wan folder with random weights at Wan2.1-T2V-1.3B size (no download needed).

The transformer and VAE have the real 1.3B configs; the UMT5 text encoder has the real width
(4096, what the DiT reads) but one layer and a tiny offline tokenizer, to keep the folder small.
For GPU checks of memory and speed through the same loaders as real weights:

  python scripts/make_random_wan_folder.py /tmp/wan-1.3b-random
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.wan_folder import VOCAB, _tokenizer  # noqa: E402

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


def main(root: str, transformer: bool = True) -> None:
    """Write the folder; transformer=False leaves out transformer/ (callers that build the DiT in memory)."""
    root = Path(root)
    torch.manual_seed(0)
    _tokenizer().save_pretrained(root / "tokenizer")
    text = UMT5Config(vocab_size=len(VOCAB), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                      relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(text).to(torch.bfloat16).save_pretrained(root / "text_encoder")
    AutoencoderKLWan().save_pretrained(root / "vae")  # the default config is Wan2.1's VAE
    if transformer:
        WanTransformer3DModel(**WAN_1_3B).save_pretrained(root / "transformer")
    print(root)


if __name__ == "__main__":
    main(sys.argv[1])
