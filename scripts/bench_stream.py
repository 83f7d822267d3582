"""Stream benchmark: a long `engine.stream.Stream` at Wan2.1-1.3B size (random weights), chunk by chunk.

Builds the student as scripts/bench_inference.py does (the real 1.3B DiT and Wan VAE configs with random
weights; the UMT5 encoder has the real width but one layer), switches on configs/inference.yaml's speed
levers for the device, and streams --seconds of 832x480 video from one prompt, switching the prompt every
--switch-every seconds (re-cache on unless --no-recache). The rolling window and sink are the stream's
(--window, --sink; default 21 and 0, Self-Forcing's training length).

Per chunk: the wall time from the previous chunk's return to this one's (its frames are on the host then;
with lookahead 1 the decode of one chunk overlaps the next one's DiT, so this is the steady cost of a
chunk) and the memory allocated after it. Overall: FPS (frames / wall time, warm-up included, and after
the warm-up: once positions have been renumbered, when every CUDA graph exists), peak allocated and
reserved memory (overall and after the warm-up), the growth of the per-chunk time and memory from the
second quarter to the last, and the chunks that re-cached. Writes <out>.json and <out>.png (both curves).

  python scripts/bench_stream.py --seconds 300 --max-wall 330 --out bench_stream     # H200: 5 minutes of video
  python scripts/bench_stream.py --tiny --device cpu --seconds 4 --out /tmp/bench_stream  # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.stream import Stream, StreamSchema, shift_threshold  # noqa: E402
from engine.student import Student  # noqa: E402
from model.base import MethodConfig  # noqa: E402
from utils.speed import SpeedSchema, apply_levers, resolve_levers  # noqa: E402

PROMPTS = ["a red car driving through a city street at night", "a dog running in a forest at sunset",
           "a yellow car moving slowly on a street in the forest"]


def build_student(args, device: torch.device) -> Student:
    from scripts.bench_inference import build

    generator, text_encoder, vae = build(args, device)
    runner, decode_stream = apply_levers(generator, vae, resolve_levers(SpeedSchema(), device))
    cfg = MethodConfig(num_frame_per_block=args.block, num_training_frames=args.window)
    return Student(generator, text_encoder, vae, cfg, tuple(args.latent_shape), runner=runner, decode_stream=decode_stream)


def memory(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def quarter_growth(values: list[float]) -> float | None:
    """Median of the last quarter minus median of the second quarter (None when too short)."""
    q = len(values) // 4
    if q < 1:
        return None
    return statistics.median(values[-q:]) - statistics.median(values[q : 2 * q])


@torch.no_grad()
def run(args) -> dict:
    device = torch.device(args.device)
    wall = time.perf_counter()
    student = build_student(args, device)
    built_s = time.perf_counter() - wall
    settings = StreamSchema(window=args.window, sink=args.sink, recache=args.recache, lookahead=args.lookahead)
    stream = Stream(student, PROMPTS[0], seed=0, settings=settings, fps=args.fps)
    warm_frame = shift_threshold(stream.pattern)  # the first renumbering: every chunk position has its graph
    frames_wanted = round(args.seconds * args.fps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, frames, warm_mark, warm_peak = [], 0, None, None
    start = last = time.perf_counter()
    next_switch, switch_index = args.switch_every, 1
    for chunk in stream:
        now = time.perf_counter()
        frames += chunk.frames.shape[0]
        rows.append({"chunk": len(rows), "latent_start": chunk.latent_start, "video_s": float(chunk.timestamps[-1]),
                     "seconds": now - last, "allocated_gib": memory(device), "prompt": chunk.prompt,
                     "switched": any(f == chunk.latent_start for f, _, _ in stream.switches)})
        last = now
        if warm_mark is None and chunk.latent_start >= warm_frame:
            warm_mark = (now, frames, len(rows))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if frames >= frames_wanted or (args.max_wall and now - wall > args.max_wall):
            break
        if args.switch_every and chunk.timestamps[-1] >= next_switch:
            stream.switch(PROMPTS[switch_index % len(PROMPTS)])
            next_switch += args.switch_every
            switch_index += 1
    total = time.perf_counter() - start
    if device.type == "cuda":
        warm_peak = (torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30)
    switches = [{"latent_frame": f, "prompt": p, "recache": r} for f, p, r in stream.switches]
    graphs = len(student.runner.graphs) if hasattr(student.runner, "graphs") else None  # CUDA graphs held (bounded)
    stream.stop()
    steady = rows[warm_mark[2]:] if warm_mark else []
    times = [r["seconds"] for r in steady]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "args": vars(args), "build_s": built_s, "chunks": len(rows), "frames": frames, "video_s": frames / args.fps,
        "wall_s": total, "fps": frames / total, "first_chunk_s": rows[0]["seconds"] if rows else None,
        "warm_up_chunks": warm_mark[2] if warm_mark else None,
        "fps_after_warm_up": (frames - warm_mark[1]) / (total - (warm_mark[0] - start)) if warm_mark and steady else None,
        "chunk_s_median_after_warm_up": statistics.median(times) if times else None,
        "chunk_s_max_after_warm_up": max((r["seconds"] for r in steady if not r["switched"]), default=None),
        "chunk_s_growth_q2_to_q4": quarter_growth([r["seconds"] for r in steady if not r["switched"]]),
        "switch_chunk_s": [r["seconds"] for r in rows if r["switched"]],
        "allocated_gib_growth_q2_to_q4": quarter_growth([r["allocated_gib"] for r in steady]),
        "peak_allocated_gib_after_warm_up": warm_peak[0] if warm_peak else None,
        "peak_reserved_gib_after_warm_up": warm_peak[1] if warm_peak else None,
        "switches": switches, "cuda_graphs": graphs, "stopped_by_max_wall": frames < frames_wanted, "rows": rows,
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = max(r["allocated_gib"] for r in rows)  # sampled between chunks
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["video_s"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(x, [r["seconds"] * 1e3 for r in rows], lw=0.8)
    top.set_ylabel("chunk time (ms)")
    warm = result["warm_up_chunks"]
    if warm is not None:
        steady = [r["seconds"] * 1e3 for r in rows[warm:]]
        if steady:
            top.set_ylim(0, 2 * max(steady))  # the warm-up (compilation, graph capture) would flatten the rest
    bottom.plot(x, [r["allocated_gib"] for r in rows], lw=0.8, color="C1")
    bottom.set_ylabel("allocated (GiB)")
    bottom.set_xlabel("video time (s)")
    for r in rows:
        if r["switched"]:
            for ax in (top, bottom):
                ax.axvline(r["video_s"], color="grey", lw=0.5, ls="--")
    fig.suptitle(f"{result['device']}: {result['video_s']:.0f} s of video, {result['fps']:.1f} FPS "
                 f"({result['fps_after_warm_up'] or float('nan'):.1f} after warm-up); dashed: prompt switches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="seconds of video to stream")
    p.add_argument("--max-wall", type=float, default=0.0, help="stop earlier once the run has taken this many seconds (0: never)")
    p.add_argument("--switch-every", type=float, default=60.0, help="switch the prompt every this many seconds of video (0: never)")
    p.add_argument("--no-recache", dest="recache", action="store_false", help="plain switches (cross-attention only)")
    p.add_argument("--window", type=int, default=21, help="latent frames of the rolling window")
    p.add_argument("--sink", type=int, default=0, help="latent frames of the sink")
    p.add_argument("--block", type=int, default=3, help="latent frames per chunk")
    p.add_argument("--lookahead", type=int, default=None, help="chunks started ahead (default: 1 on CUDA, 0 on the CPU)")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--latent-shape", type=int, nargs=3, default=[16, 60, 104], help="C H W of a latent frame (480x832)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny test folder's sizes (a CPU smoke test)")
    p.add_argument("--out", default="bench_stream", help="writes <out>.json and <out>.png")
    args = p.parse_args(argv)
    if args.tiny and args.latent_shape == [16, 60, 104]:
        args.latent_shape, args.text_len = [4, 8, 8], 16
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k not in ("rows", "args")}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
