"""Backbone check on a GPU at Wan2.1-T2V-1.3B size (random weights): parity of the modes and chunk timings.

Reports
- the max relative error between the chunked KV-cache forward and the whole-clip block-causal
  forward (FlexAttention), in bf16 and in float32;
- the time of one chunk forward (default 3 frames of a 60x104 latent, 512 text tokens) with an empty
  cache and with 18 frames cached, cross-attention K/V cached, median of --repeats after warm-up.

  python scripts/bench_backbone.py --out bench_backbone.json
Sizes are flags; the defaults are Wan2.1-T2V-1.3B's (dim 1536 = 12 heads x 128, 30 layers,
FFN 8960, text dim 4096, 16 latent channels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.wan.attention import CausalPattern  # noqa: E402
from model.wan.kv_cache import CrossAttnCache, KVCache  # noqa: E402
from model.wan.transformer import WanDiT  # noqa: E402


def build(args, dtype) -> WanDiT:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanDiT(
            patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
            in_channels=args.channels, out_channels=args.channels, text_dim=args.text_dim, freq_dim=256,
            ffn_dim=args.ffn_dim, num_layers=args.layers, cross_attn_norm=True,
        )
    return model.to(dtype).eval().requires_grad_(False)


def chunked(model, pattern, x, t, ctx):
    batch, frames, _, height, width = x.shape
    cache = KVCache.for_model(model, pattern, batch_size=batch, latent_hw=(height, width), max_frames=frames)
    cross = CrossAttnCache(model.config.num_layers)
    outs, f = [], 0
    while f < frames:
        n = pattern.block_length(f)
        outs.append(model(x[:, f : f + n], t[:, f : f + n], ctx, kv_cache=cache, frame_offset=f, crossattn_cache=cross))
        f += n
    return torch.cat(outs, dim=1)


@torch.no_grad()
def parity(model, args, dtype) -> float:
    pattern = CausalPattern(num_frame_per_block=args.block)
    gen = torch.Generator("cuda").manual_seed(1)
    shape = (1, args.frames, args.channels, args.height, args.width)
    x = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    t = torch.rand(1, args.frames, generator=gen, device="cuda") * 1000
    ctx = torch.randn(1, args.text_len, args.text_dim, generator=gen, device="cuda", dtype=dtype)
    whole = model(x, t, ctx, causal=pattern).float()
    chunks = chunked(model, pattern, x, t, ctx).float()
    return ((chunks - whole).abs().max() / whole.abs().max()).item()


@torch.no_grad()
def time_chunk(model, args, cached_frames: int) -> float:
    """Median milliseconds of one chunk forward at frame offset `cached_frames`."""
    dtype = next(model.parameters()).dtype
    pattern = CausalPattern(num_frame_per_block=args.block)
    n = args.block
    cache = KVCache.for_model(model, pattern, batch_size=1, latent_hw=(args.height, args.width), max_frames=cached_frames + n)
    cross = CrossAttnCache(model.config.num_layers)
    x = torch.randn(1, n, args.channels, args.height, args.width, device="cuda", dtype=dtype)
    t = torch.full((1, n), 500.0, device="cuda")
    ctx = torch.randn(1, args.text_len, args.text_dim, device="cuda", dtype=dtype)
    for f in range(0, cached_frames, n):  # fill the cache up to the timed chunk
        model(x, t, ctx, kv_cache=cache, frame_offset=f, crossattn_cache=cross)
    model(x, t, ctx, kv_cache=cache, frame_offset=cached_frames, crossattn_cache=cross)  # warm-up + advance
    times = []
    for _ in range(args.warmup + args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x, t, ctx, kv_cache=cache, frame_offset=cached_frames, crossattn_cache=cross)  # same slots
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[args.warmup :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--ffn-dim", type=int, default=8960)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--frames", type=int, default=21, help="latent frames of the parity clip")
    p.add_argument("--height", type=int, default=60)
    p.add_argument("--width", type=int, default=104)
    p.add_argument("--block", type=int, default=3, help="num_frame_per_block (= chunk frames)")
    p.add_argument("--cached", type=int, default=18, help="frames in the cache for the second timing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-fp32", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    model = build(args, torch.bfloat16)
    result["parity_bf16_max_rel_err"] = parity(model, args, torch.bfloat16)
    result["chunk_ms_empty_cache"] = time_chunk(model, args, 0)
    result[f"chunk_ms_{args.cached}_frames_cached"] = time_chunk(model, args, args.cached)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not args.skip_fp32:
        del model
        torch.cuda.empty_cache()
        result["parity_fp32_max_rel_err"] = parity(build(args, torch.float32), args, torch.float32)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
