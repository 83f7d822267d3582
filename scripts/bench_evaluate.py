"""Evaluation benchmark: evaluate.py's wall time at Wan2.1-T2V-1.3B size with random weights, teacher rows
included (issue 27): by default 16 prompts of 21 latent frames (81 video frames at 480 x 832) in batches of 8.

Writes its assets once under --root and reuses them: a random Wan folder (scripts/make_random_wan_folder.py;
the transformer is made here, on the device in bf16, so the folder is quick to write and read), the same
weights as the student's Self-Forcing .pt, a random CLIP at ViT-B/32 size (transformers; CLIP's cost, not
its scores) and a prompt file. Then it runs `engine.evaluate.run` (what evaluate.py runs: the students
through inference's generate with its static caches and CUDA graphs, the teacher's CFG'd Euler ODE, the
scores, every video, metrics.json, drift.png, index.html) and prints where the time went (metrics.json
"wall" and "speed"). The teacher's step count is a flag: at 1.3B its 50 steps alone take minutes.

  python scripts/bench_evaluate.py --teacher-steps 4 --out bench_evaluate.json     # one H200
  python scripts/bench_evaluate.py --tiny --device cpu                             # smoke test on a CPU
  python scripts/bench_evaluate.py ... speed.cuda_graphs=false                     # any evaluate.yaml override
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import evaluate as ev  # noqa: E402
from engine.student import group_overrides  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "white", "black")
THINGS = ("car", "dog", "cat", "circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down")
PLACES = ("on the street at sunset", "in the forest", "")  # the tiny tokenizer's words (tests/wan_folder.py)


def prompts(count: int) -> list[str]:
    combos = itertools.product(PLACES, MOTIONS, COLOURS, THINGS)
    return [" ".join(f"a {c} {t} {m} {p}".split()) for p, m, c, t in itertools.islice(combos, count)]


def make_wan_folder(folder: Path, tiny: bool, device: torch.device) -> Path:
    """A random Wan folder: the tests' tiny one, or Wan2.1-T2V-1.3B's size (scripts/make_random_wan_folder.py, its
    transformer made here, on the device in bf16, so the folder is quick to write and read)."""
    from tests.wan_folder import make_tiny_wan_folder

    if tiny:
        return make_tiny_wan_folder(folder)
    from diffusers import WanTransformer3DModel

    from scripts.make_random_wan_folder import WAN_1_3B, main as make_folder

    make_folder(str(folder), transformer=False)
    with torch.device(device):  # random init on the GPU: seconds, not minutes of CPU
        transformer = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16)
    transformer.save_pretrained(folder / "transformer")
    return folder


def make_assets(root: Path, tiny: bool, device: torch.device) -> dict:
    """The Wan folder, the student .pt, a CLIP folder; each written once (a marker file says it is complete)."""
    from model.wan.weights import read_state_dict
    from tests.test_video_metrics import make_tiny_clip

    root.mkdir(parents=True, exist_ok=True)
    folder, pt, clip = root / "wan", root / "student.pt", root / "clip"
    done = root / ".complete"
    if done.is_file():
        return {"folder": folder, "pt": pt, "clip": clip}
    start = time.perf_counter()
    make_wan_folder(folder, tiny, device)
    if tiny:
        make_tiny_clip(clip)
    else:
        from transformers import CLIPConfig, CLIPModel

        from tests.wan_folder import _tokenizer

        CLIPModel(CLIPConfig()).save_pretrained(clip)  # CLIPConfig's defaults are ViT-B/32's
        _tokenizer().save_pretrained(clip)
    torch.save({"generator_ema": read_state_dict(folder)}, pt)  # the teacher's weights as the student's
    done.write_text("")
    print(f"assets written to {root} in {time.perf_counter() - start:.1f} s", flush=True)
    return {"folder": folder, "pt": pt, "clip": clip}


def overrides(args, assets: dict, prompt_file: Path) -> list[str]:
    groups = ["model=wan2.1_t2v_1.3b", f"model.path={assets['folder']}", "data=prompts", f"data.prompts.path={prompt_file}",
              f"method.num_training_frames={args.frames}", "method.guidance_scale=3.0"]
    if args.tiny:
        groups += ["model.dtype=float32", "model.latent_shape=[4,4,4]", "model.text_encoder.text_len=16",
                   "method.num_frame_per_block=1", "method.denoising_step_list=[1000,500]"]
    return groups


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/bench_evaluate", help="where the random assets are written once")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (one seed each)")
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default 21 = 81 video frames; --tiny: 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos generated together")
    parser.add_argument("--teacher-steps", type=int, default=4, help="the teacher's Euler steps (CFG: two forwards each)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny random Wan folder and CLIP of the tests")
    parser.add_argument("--no-videos", action="store_true", help="videos=false: time generation and scores alone")
    parser.add_argument("--out", default=None, help="also write the summary as JSON here")
    parser.add_argument("overrides", nargs="*", help="evaluate.yaml overrides, e.g. speed.cuda_graphs=false")
    args = parser.parse_args(argv)
    args.frames = args.frames or (2 if args.tiny else 21)
    device = torch.device(args.device)
    root = Path(args.root) / ("tiny" if args.tiny else "wan1.3b")
    assets = make_assets(root, args.tiny, device)
    prompt_file = root / f"prompts_{args.prompts}.txt"
    prompt_file.write_text("\n".join(prompts(args.prompts)) + "\n")
    groups = overrides(args, assets, prompt_file)
    videos = not args.no_videos
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        if videos:
            print("imageio-ffmpeg is not installed here: timing without the mp4 files (videos=false)", flush=True)
        videos = False
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"checkpoints={assets['pt']}", "names=[student]", f"prompts={prompt_file}", "seed=0",
            f"batch_size={args.batch_size}", f"teacher.steps={args.teacher_steps}", f"clip.weights={assets['clip']}",
            f"device={args.device}", f"videos={str(videos).lower()}", "overwrite=true", *groups, *args.overrides])
    out = root / "evaluation"
    start = time.perf_counter()
    metrics = ev.run(cfg, out, group_overrides(groups + list(args.overrides)))
    total = time.perf_counter() - start
    s, t = metrics["speed"]["student"], metrics["speed"].get("teacher", {})
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "prompts": args.prompts, "latent_frames": args.frames, "video_frames": metrics["pixel_frames"],
        "batch_size": args.batch_size, "teacher_steps": args.teacher_steps, "videos": videos, "total_s": total,
        "wall": metrics["wall"],
        "student_fps": s["throughput_fps"], "student_fps_after_first_batch": s.get("throughput_fps_after_first_batch"),
        "first_chunk_latency_s": s["first_chunk_latency_s"], "student_generation_s": s["timing"]["generation_s"],
        "teacher_fps": t.get("throughput_fps"), "teacher_generation_s": t.get("generation_s"),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "output_dir": str(out),
    }
    print("\n| phase | seconds |\n| --- | --- |")
    for phase, seconds in metrics["wall"].items():
        print(f"| {phase} | {seconds:.1f} |")
    print(f"\nevaluate: {total:.1f} s for {args.prompts} prompts x {metrics['pixel_frames']} frames, teacher {args.teacher_steps} "
          f"steps; student {s['throughput_fps']:.1f} frames/s (after the first batch: "
          f"{summary['student_fps_after_first_batch'] or float('nan'):.1f}), first chunk {s['first_chunk_latency_s']:.3f} s; "
          f"teacher {summary['teacher_fps'] or float('nan'):.2f} frames/s ({summary['teacher_generation_s'] or float('nan'):.1f} s "
          f"for {args.teacher_steps} steps with CFG and the decode)" + (
              f"; peak {summary['peak_gib']:.1f} GiB" if summary["peak_gib"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
