"""Where the streaming generator's time goes, at Wan2.1-1.3B size on random weights (a GPU tool).

Three views, for one lever configuration (bench_inference.py's names; default: `default`):
- the first chunk, piece by piece with CUDA events and a sync after each piece: text encoding, the
  cross-attention cache fill, each of its four generator calls, and its decode (9 frames);
  the same for the last chunk position, whose calls attend to the longest cache;
- GPU kernel time by kind (attention, matrix products, convolutions, compiled kernels, the rest) of
  one rollout and of one streamed decode, from torch.profiler, with CUDA graphs off so that every
  kernel is attributed (the kernels are the same);
- the block's matrix products and its attention alone, at a chunk's shapes, as a throughput floor.

  python scripts/profile_inference.py --config default --out profile.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.base import MethodConfig  # noqa: E402
from pipeline.cuda_graphs import ChunkGraphs  # noqa: E402
from pipeline.rollout import rollout  # noqa: E402
from scripts.bench_attention import geometry  # noqa: E402
from scripts.bench_inference import PROMPT, build, configurations, decode_chunks  # noqa: E402
from engine.inference import Student, generate  # noqa: E402
from engine.items import Item  # noqa: E402
from utils.speed import apply_levers  # noqa: E402

KINDS = (  # first match wins; kernel names of cuDNN, cuBLAS (nvjet / sm90 xmma), inductor
    ("attention", re.compile(r"sdpa|fmha|flash|attention", re.I)),
    ("convolution", re.compile(r"conv|fprop|implicit_gemm|xmma_.*fprop|sm90_xmma_fprop|dgrad|wgrad", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|sm90_xmma|cutlass|ampere_bf16|sm80_xmma", re.I)),
    ("compiled", re.compile(r"^triton_", re.I)),
    ("copy / cat", re.compile(r"copy|cat|memcpy|memset|fill", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def kernel_summary(fn, top: int = 15) -> dict:
    """GPU kernel milliseconds of fn() by kind, and the `top` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_kind, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.device_time / 1e3
        by_kind[kind_of(event.name)] += ms
        by_name[event.name] += ms
        count[event.name] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"total_ms": sum(by_kind.values()), "by_kind_ms": dict(by_kind),
            "top": [{"name": n[:120], "ms": ms, "calls": count[n]} for n, ms in ranked]}


def chunk_pieces(student: Student, items, frames: int, repeats: int) -> dict:
    """Milliseconds of the first chunk's pieces and of the last chunk's calls (median of `repeats`)."""
    device = student.device
    per = student.cfg.num_frame_per_block
    last = frames - per

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    samples = defaultdict(list)
    for _ in range(repeats):
        torch.cuda.synchronize()
        marks = [("start", event())]
        context = student.encode([it.prompt for it in items])
        marks.append(("text", event()))
        noise = torch.randn((len(items), frames, *student.latent_shape), device=device)
        kv, cross = student.caches(len(items), frames, student.pattern, noise.shape[-2:])
        student.runner.fill_crossattn_cache(context, cross)  # a graph replay when the runner is ChunkGraphs
        marks.append(("cross-attention cache fill", event()))
        x = noise[:, :per]
        for i, t in enumerate(student.steps):
            timestep = torch.full(x.shape[:2], t, device=device)
            flow = student.runner(x, timestep, context, kv_cache=kv, frame_offset=0, crossattn_cache=cross)
            x0 = student.schedule.x0_from_flow(x, flow, t)
            marks.append((f"chunk 0 call {i}", event()))
            if i + 1 < len(student.steps):
                x = student.schedule.add_noise(x0, torch.randn_like(x0), student.steps[i + 1])
        decoder = student.vae.stream_decoder(len(items))
        for i in range(per):
            decoder.decode(x0[:, i:i + 1])
            marks.append((f"chunk 0 decode, latent frame {i}", event()))
        student.runner(x0, torch.zeros(x0.shape[:2], device=device), context, kv_cache=kv, frame_offset=0,
                       crossattn_cache=cross)
        marks.append(("chunk 0 context pass", event()))
        for start in range(per, last, per):  # fill the cache up to the last chunk
            student.runner(noise[:, start:start + per], torch.zeros((len(items), per), device=device), context,
                           kv_cache=kv, frame_offset=start, crossattn_cache=cross)
        marks.append(("(context passes of the middle chunks)", event()))
        x = noise[:, last:]
        for i, t in enumerate(student.steps):
            timestep = torch.full(x.shape[:2], t, device=device)
            student.runner(x, timestep, context, kv_cache=kv, frame_offset=last, crossattn_cache=cross)
            marks.append((f"last chunk call {i}", event()))
        decoder.decode(noise[:, last:])
        marks.append(("a later chunk's decode", event()))
        torch.cuda.synchronize()
        for (_, a), (name, b) in zip(marks, marks[1:]):
            samples[name].append(a.elapsed_time(b))
    return {name: statistics.median(v) for name, v in samples.items()}


def floors(device, g: dict, repeats: int = 20) -> dict:
    """TFLOP/s of the block's products and attention alone at one chunk's shapes (bf16); g: bench_attention.geometry()."""
    tokens, cached = g["chunk_frames"] * g["tokens_per_frame"], g["clip_frames"] * g["tokens_per_frame"]
    dim, ffn, heads = g["dim"], g["ffn"], g["heads"]
    out = {}

    def rate(fn, flops):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / repeats
        return {"us": seconds * 1e6, "tflops": flops / seconds / 1e12}

    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    for name, (n, k) in {"q/k/v/o": (dim, dim), "qkv fused": (3 * dim, dim), "ffn up": (ffn, dim),
                         "ffn down": (dim, ffn)}.items():
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, device=device, dtype=torch.bfloat16)
        a = x if k == dim else torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        out[f"linear {name} {n}x{k}"] = rate(lambda: F.linear(a, w, b), 2 * tokens * n * k)
    w = torch.randn(ffn, dim, device=device, dtype=torch.bfloat16) / dim**0.5
    b = torch.randn(ffn, device=device, dtype=torch.bfloat16)
    out["ffn up + gelu(tanh), separate"] = rate(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"), 2 * tokens * ffn * dim)
    out["ffn up + gelu(tanh), cuBLASLt epilogue"] = rate(
        lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), 2 * tokens * ffn * dim)
    head_dim = dim // heads
    q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
    for kv_len in (tokens, cached // 2, cached):
        k = torch.randn(1, heads, kv_len, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out[f"attention q {tokens} kv {kv_len}"] = rate(lambda: F.scaled_dot_product_attention(q, k, v),
                                                          4 * tokens * kv_len * dim)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="one of bench_inference.py's configuration names")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--latent-shape", type=int, nargs=3, default=[16, 60, 104])
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--parts", default="pieces,kernels,floors", help="comma list of: pieces, kernels, floors")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    parts_wanted = set(args.parts.split(","))
    result = {"device": torch.cuda.get_device_name(device)}
    if "floors" in parts_wanted:
        result["floors"] = floors(device, geometry())
    if parts_wanted & {"pieces", "kernels"}:
        result.update(generator_profile(args, device, parts_wanted))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def generator_profile(args, device, parts_wanted) -> dict:
    result = {}
    (name, levers), = configurations([args.config])
    parts = build(args, device)
    generator, text_encoder, vae = parts
    runner, _ = apply_levers(generator, vae, levers)
    student = Student(generator, text_encoder, vae, MethodConfig(), tuple(args.latent_shape), runner=runner)
    items = [Item(0, PROMPT, 0, "profile")]
    for _ in range(2):
        generate(student, items, args.frames)
    result.update(config=name, levers=levers)
    result["e2e_first_chunk_s"] = statistics.median(
        generate(student, items, args.frames)[2]["first_chunk_s"] for _ in range(args.repeats))
    if "pieces" in parts_wanted:
        result["pieces_ms"] = chunk_pieces(student, items, args.frames, args.repeats)

    # Kernels, graphs off (the same kernels, each attributed)
    if isinstance(runner, ChunkGraphs):
        runner.clear()
    student = Student(generator, text_encoder, vae, MethodConfig(), tuple(args.latent_shape), runner=generator)
    context = student.encode([PROMPT])
    noise = torch.randn((1, args.frames, *student.latent_shape), device=device)

    def dit():
        kv, cross = student.caches(1, args.frames, student.pattern, noise.shape[-2:])
        return rollout(generator, noise, context, student.steps, student.pattern, schedule=student.schedule,
                       kv_cache=kv, crossattn_cache=cross).video

    if "kernels" in parts_wanted:
        latents = dit()
        result["dit_kernels"] = kernel_summary(dit)
        decode_chunks(student, latents)
        result["vae_kernels"] = kernel_summary(lambda: decode_chunks(student, latents))
    return result


if __name__ == "__main__":
    main()
