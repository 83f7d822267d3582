"""Inference benchmark: streaming text-to-video at Wan2.1-1.3B size, each speed lever on or off.

Builds the student in memory with random weights (the real 1.3B DiT and Wan VAE configs; the UMT5
encoder has the real width but one layer, see scripts/make_random_wan_folder.py, so its time is not
UMT5-XXL's) and, for every configuration, times through `engine.inference.generate` (the code
inference.py runs):
- text: encoding the prompt batch;
- dit: the rollout alone (all chunks, steps and context passes), no decoding;
- vae: the streaming decode of the clip alone, chunk by chunk;
- total / fps / first_chunk: one batch end to end (noise, text, rollout, streamed decode, to CPU);
  FPS = decoded frames / total; first_chunk = start until the first chunk's frames are decoded;
- peak memory of the end-to-end runs (allocated, and reserved by the allocator);
- TFLOP/s: FLOPs counted once with torch.utils.flop_counter on the plain path (the DiT's matrix
  products and attention, the VAE decoder's convolutions) over the measured times;
- err: max |latents - plain's| / max |plain's| (and the same for the pixels), same noise and prompt.
Warm-up runs (compilation, graph capture, cuDNN autotuning) are excluded; each number is the median
of --repeats runs. Prints a markdown table, writes JSON.

  python scripts/bench_inference.py --out bench_inference.json                  # the lever ladder, H100
  python scripts/bench_inference.py --configs plain,all --repeats 5
  python scripts/bench_inference.py --tiny --device cpu --repeats 1              # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.base import MethodConfig  # noqa: E402
from model.wan.attention import fa4_supported  # noqa: E402
from model.wan.text_encoder import WanTextEncoder  # noqa: E402
from model.wan.transformer import WanDiT  # noqa: E402
from model.wan.vae import WanVAE  # noqa: E402
from pipeline.cuda_graphs import ChunkGraphs  # noqa: E402
from pipeline.rollout import rollout  # noqa: E402
from engine.inference import Student, generate  # noqa: E402
from engine.items import Item  # noqa: E402
from utils.speed import LEVERS, SpeedSchema, apply_levers, resolve_levers  # noqa: E402

OFF = dict.fromkeys(LEVERS, False)
KNOBS = (*LEVERS, "dit_fp8")  # the levers and speed.dit_precision=fp8 (not exact), as "+dit_fp8" in a configuration name
# The ladder: each configuration adds one lever to the one before ("+" rows of the table).
LADDER = [
    ("plain", {}),
    ("+cudnn_attention", {"cudnn_attention": True}),
    ("+fused_elementwise", {"fused_elementwise": True}),
    ("+cuda_graphs", {"cuda_graphs": True}),
    ("+vae_channels_last", {"vae_channels_last": True}),
    ("+cudnn_benchmark", {"cudnn_benchmark": True}),
    ("+vae_fused_norm", {"vae_fused_norm": True}),
    ("+vae_stacked_conv", {"vae_stacked_conv": True}),
    ("+decode_stream", {"decode_stream": True}),
    ("+fa4_attention", {"fa4_attention": True, "cudnn_attention": False}),  # FA4 replaces cuDNN for self-attention
]
PROMPT = "a red car moving left on a street at sunset"


def configurations(names: list[str], device: torch.device = torch.device("cuda")) -> list[tuple[str, dict]]:
    """Named lever sets: the ladder's rows (cumulative), "all", "plain", "all-<lever>" (one off), "only+<lever>",
    "default" (configs/inference.yaml's speed: block on `device`) and "default+<lever>-<lever>..." (levers on / off)."""
    ladder, levers = {}, dict(OFF)
    for name, delta in LADDER:
        levers = {**levers, **delta}
        ladder[name] = levers
    out = []
    for name in names:
        if name in ladder:
            out.append((name, ladder[name]))
        elif name == "all" or (name.startswith("all-") and name[4:] in LEVERS):
            every = dict.fromkeys(LEVERS, True)
            # one attention kernel: FA4 where flash-attn-4 runs, else cuDNN
            every["fa4_attention"] = fa4_supported(torch.device("cuda")) is None
            every["cudnn_attention"] = not every["fa4_attention"]
            out.append((name, every if name == "all" else {**every, name[4:]: False}))
        elif name == "default":
            out.append((name, resolve_levers(SpeedSchema(), device)))
        elif name.startswith("default") and all(lever in KNOBS for lever in re.split("[+-]", name)[1:]):
            levers = resolve_levers(SpeedSchema(), device)
            for sign, lever in re.findall("([+-])([a-z0-9_]+)", name[7:]):
                levers[lever] = sign == "+"
            out.append((name, levers))
        elif name.startswith("only+") and name[5:] in KNOBS:
            out.append((name, {**OFF, name[5:]: True}))
        else:
            raise ValueError(f"unknown configuration {name!r}: expected ladder, all, default, all-<lever>, only+<lever>, "
                             f"default+<lever>-<lever>... or one of {list(ladder)}")
    return out


def build(args, device: torch.device):
    """(generator, text encoder, vae): the DiT in memory, VAE and text encoder through their loaders."""
    from scripts.make_random_wan_folder import WAN_1_3B
    from scripts.make_random_wan_folder import main as write_folder

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.tiny:
        from tests.wan_folder import TRANSFORMER, make_tiny_wan_folder

        folder, backbone = make_tiny_wan_folder(Path(tempfile.mkdtemp()) / "wan"), TRANSFORMER
    else:
        folder, backbone = Path(tempfile.mkdtemp()) / "wan", WAN_1_3B
        write_folder(str(folder), transformer=False)
    torch.manual_seed(0)
    with torch.device(device):
        generator = WanDiT(**backbone)
    generator = generator.to(dtype).eval().requires_grad_(False)
    text_encoder = WanTextEncoder(str(folder), text_len=args.text_len, dtype=args.dtype, device=device).eval()
    vae = WanVAE(str(folder), dtype=args.dtype, device=device).eval()
    return generator, text_encoder, vae


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int) -> tuple[float, list[float], object]:
    """(median seconds, all seconds, last result) of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


@torch.no_grad()
def count_flops(student: Student, items, frames: int, context) -> dict:
    """FLOPs of one rollout (DiT) and one streamed decode (VAE), counted on the plain path."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator(student.device).manual_seed(0)
    noise = torch.randn((len(items), frames, *student.latent_shape), generator=gen, device=student.device)
    kv, cross = student.caches(len(items), frames, student.pattern, noise.shape[-2:])
    with FlopCounterMode(display=False) as counter:
        latents = rollout(student.generator, noise, context, student.steps, student.pattern, schedule=student.schedule,
                          kv_cache=kv, crossattn_cache=cross).video
    dit = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        decode_chunks(student, latents)
    return {"dit_flops": dit, "vae_flops": counter.get_total_flops()}


def decode_chunks(student: Student, latents: torch.Tensor) -> torch.Tensor:
    decoder = student.vae.stream_decoder(latents.shape[0])
    starts = list(range(0, latents.shape[1], student.cfg.num_frame_per_block))
    return torch.cat([decoder.decode(latents[:, s : s + student.cfg.num_frame_per_block]) for s in starts], dim=1)


def bench_config(name, levers, parts, args, device, items, reference) -> dict:
    generator, text_encoder, vae = parts
    if levers.get("dit_fp8"):  # fp8 converts the blocks' weights in place: a copy, so later rows get bf16 ones
        generator = copy.deepcopy(generator)
    generator.set_attention_backend("sdpa")
    runner, stream = apply_levers(generator, vae, levers)
    student = Student(generator, text_encoder, vae, MethodConfig(), tuple(args.latent_shape), runner=runner,
                      decode_stream=stream)
    frames = args.frames
    row = {"config": name, "levers": levers}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # End to end, as inference.py runs a batch
    results = []

    def e2e():
        out = generate(student, items, frames)
        results.append(out[2])
        return out

    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        e2e()
    row["warmup_s"] = time.perf_counter() - warmup_start
    results.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, _, (latents, pixels, _) = timed(e2e, device, args.repeats, 0)
    row["total_s"] = statistics.median(r["seconds"] for r in results)
    row["total_s_all"] = [r["seconds"] for r in results]
    row["first_chunk_s"] = statistics.median(r["first_chunk_s"] for r in results)
    row["frames"] = pixels.shape[1]
    row["fps"] = row["frames"] * len(items) / row["total_s"]
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30

    # The parts alone
    prompts = [it.prompt for it in items]
    row["text_s"], _, context = timed(lambda: student.encode(prompts), device, args.repeats, 1)
    noise = torch.randn((len(items), frames, *student.latent_shape), generator=torch.Generator(device).manual_seed(1),
                        device=device)

    def dit():
        kv, cross = student.caches(len(items), frames, student.pattern, noise.shape[-2:])
        return rollout(student.runner, noise, context, student.steps, student.pattern, schedule=student.schedule,
                       kv_cache=kv, crossattn_cache=cross).video

    row["dit_s"], row["dit_s_all"], dit_latents = timed(dit, device, args.repeats, 1)
    row["vae_s"], row["vae_s_all"], _ = timed(lambda: decode_chunks(student, dit_latents), device, args.repeats, 1)

    if reference is None:  # the plain configuration: the reference outputs and the FLOP count
        reference = {"latents": latents, "pixels": pixels, **count_flops(student, items, frames, context)}
    row["dit_tflops"] = reference["dit_flops"] / row["dit_s"] / 1e12
    row["vae_tflops"] = reference["vae_flops"] / row["vae_s"] / 1e12
    row["total_tflops"] = (reference["dit_flops"] + reference["vae_flops"]) / row["total_s"] / 1e12
    ref_latents, ref_pixels = reference["latents"], reference["pixels"]
    row["latents_rel_err"] = ((latents - ref_latents).abs().max() / ref_latents.abs().max()).item()
    row["pixels_rel_err"] = ((pixels - ref_pixels).abs().max() / ref_pixels.abs().max()).item()
    row["pixels_mean_abs_err"] = (pixels - ref_pixels).abs().mean().item()
    if isinstance(runner, ChunkGraphs):
        runner.clear()
    student = runner = stream = None  # let the graphs and caches go before the next configuration
    gc.collect()
    return row, reference


def table(rows: list[dict], device_name: str) -> str:
    head = ("| config | text ms | DiT s | VAE s | total s | FPS | first chunk s | peak GiB | DiT TFLOP/s | "
            "VAE TFLOP/s | latents err | pixels err |")
    lines = [f"Device: {device_name}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][:200]} |")
            continue
        lines.append(
            f"| {r['config']} | {r['text_s'] * 1e3:.1f} | {r['dit_s']:.3f} | {r['vae_s']:.3f} | {r['total_s']:.3f} | "
            f"{r['fps']:.1f} | {r['first_chunk_s']:.3f} | {r.get('peak_allocated_gib', float('nan')):.2f} | "
            f"{r['dit_tflops']:.0f} | {r['vae_tflops']:.0f} | {r['latents_rel_err']:.1e} | {r['pixels_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ladder",
                   help="comma list: ladder, plain, +<lever> rows, all, all-<lever>, only+<lever>, default, default+/-<lever>")
    p.add_argument("--frames", type=int, default=21, help="latent frames (21 -> 81 video frames)")
    p.add_argument("--latent-shape", type=int, nargs=3, default=[16, 60, 104], help="C H W of a latent frame (480x832)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="end-to-end runs before timing (compile, capture, autotune)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny test folder's sizes (a CPU smoke test)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.tiny and args.latent_shape == [16, 60, 104]:
        args.latent_shape = [4, 8, 8]
    names = [n for n in args.configs.split(",") if n]
    if names == ["ladder"]:
        names = [n for n, _ in LADDER]
    configs = configurations(names, torch.device(args.device))
    if configs[0][0] != "plain":
        configs.insert(0, ("plain", dict(OFF)))  # every row is compared with the plain path

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = build(args, device)
    items = [Item(i, PROMPT, i, f"bench{i}") for i in range(args.batch)]
    rows, reference = [], None
    for name, levers in configs:
        try:
            row, reference = bench_config(name, levers, parts, args, device, items, reference)
        except Exception as e:  # a lever that cannot run here: report it, measure the others
            if reference is None:
                raise
            traceback.print_exc()
            row = {"config": name, "levers": levers, "error": f"{type(e).__name__}: {e}"}
            gc.collect()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    result = {"device": device_name, "torch": torch.__version__, "args": vars(args),
              "dit_flops": reference["dit_flops"], "vae_flops": reference["vae_flops"], "rows": rows}
    print(table(rows, device_name))
    print(f"FLOPs: DiT {reference['dit_flops'] / 1e12:.1f} T, VAE decode {reference['vae_flops'] / 1e12:.1f} T")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
