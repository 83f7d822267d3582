"""Image student benchmark (issue 26, item 6): Wan2.1-T2V-1.3B teacher size, random weights, bf16, one GPU.

  (a) one KD step of experiment=image_kd (model=wan_image_student: the half-depth student projected from the
      teacher; the student's own 4-step sample, the teacher's CFG'd one-frame flow, the MSE, backward, AdamW), timed by
      scripts/bench_train.py `bench` (the trainer's run_phase on the trainer's FSDP2 wrapping; the median of --steps
      after --warmup) with the peak GPU memory;
  (b) one 832 x 480 image (latent 16 x 60 x 104, one frame) as inference.py makes an image student's
      (engine/inference.py generate_images: text encoding, the steps, the VAE decode) from the KD student's weights
      as inference builds them (unsharded, in model.dtype): 50 steps with the KD student's settings, and 4 steps with
      experiment=image_kd_dmd's (denoising_step_list [1000, 750, 500, 250], fresh re-noising). The time does not
      depend on the weights, so the KD student serves both; the decode is also timed alone.

The Wan folder is written once under --root (scripts/bench_evaluate.py make_wan_folder: the real 1.3B transformer
and VAE configs, a one-layer UMT5 of the real width). Prints a markdown table; --out also writes the JSON.

  python scripts/bench_image.py --out bench_image.json              # one GPU
  python scripts/bench_image.py --tiny --device cpu                 # the same code on the tests' tiny folder
  python scripts/bench_image.py --out b.json model.attention_backend=sdpa   # any training override
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.build import DTYPES, backbone_config  # noqa: E402
from engine.config import compose_checked, method_config  # noqa: E402
from engine.inference import generate_images  # noqa: E402
from engine.items import make_items  # noqa: E402
from engine.student import FP32_CAST_WARNING, Student, without_log  # noqa: E402
from model.wan.attention import resolve_backend  # noqa: E402
from model.wan.weights import load_strict  # noqa: E402
from scripts.bench_evaluate import make_wan_folder, prompts  # noqa: E402
from scripts.bench_train import bench, build_sharded  # noqa: E402
from utils.distributed import destroy, init_distributed, single_process_group  # noqa: E402

PRESETS = {"kd_50_steps": "image_kd", "dmd_4_steps": "image_kd_dmd"}  # image samplers: whose method settings


def tiny_overrides() -> list[str]:
    """The tests' tiny folder: a 1-block student of its 2-block teacher, 4 x 4 latents, float32 (tests/wan_folder.py)."""
    from tests.wan_folder import TRANSFORMER, Z_DIM

    backbone = [f"model.backbone.{k}={json.dumps(list(v) if isinstance(v, tuple) else v, separators=(',', ':'))}"
                for k, v in {**TRANSFORMER, "num_layers": 1}.items()]
    return [*backbone, "model.dtype=float32", f"model.latent_shape=[{Z_DIM},4,4]", "model.text_encoder.text_len=16",
            "method.negative_prompt=the", "batch_size=2"]  # the tiny tokenizer's words; 16 tokens


def wan_folder(root: Path, tiny: bool, device: torch.device) -> Path:
    """The random Wan folder under root, written once (a marker file says it is complete)."""
    folder, done = root / "wan", root / ".complete"
    if not done.is_file():
        start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        make_wan_folder(folder, tiny, device)
        done.write_text("")
        print(f"Wan folder written to {folder} in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def inference_generator(method, cfg, device: torch.device) -> torch.nn.Module:
    """The trained generator as inference.py runs it (engine/student.py build_student): the method's inference
    network with the trained weights, unsharded, in model.dtype, eval, its attention backend set."""
    weights = get_model_state_dict(method.generator, options=StateDictOptions(full_state_dict=True))
    with torch.device(device):  # its random init on the GPU: seconds, not a minute of CPU at 0.7B parameters
        generator = type(method).inference_generator(backbone_config(cfg), OmegaConf.to_container(cfg.method, resolve=True))
    load_strict(generator, weights, "the benchmark's KD student")
    dtype = DTYPES[cfg.model.dtype]
    with without_log(*FP32_CAST_WARNING):  # as build_student: WanDiT keeps RoPE, modulation, norms in float32 itself
        generator.to(device=device, dtype=dtype).eval().requires_grad_(False)
    generator.set_attention_backend(resolve_backend(cfg.model.attention_backend, device, dtype))
    return generator


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_image(student: Student, prompt: str, repeats: int, warmup: int) -> dict:
    """One image through inference's generate_images, `warmup` + `repeats` times; the decode of its latent alone."""
    items = make_items([prompt], [0])
    times = []
    for _ in range(warmup + repeats):
        latents, pixels, timing = generate_images(student, items, 1)
        times.append(timing["seconds"])
    decodes = []
    with torch.no_grad():
        for _ in range(warmup + repeats):
            sync(student.device)
            start = time.perf_counter()
            student.vae.decode(latents.to(student.device))
            sync(student.device)
            decodes.append(time.perf_counter() - start)
    return {"steps": len(student.steps), "renoise": student.cfg.renoise, "image_s": statistics.median(times[warmup:]),
            "image_all_s": [round(t, 4) for t in times], "decode_s": statistics.median(decodes[warmup:]),
            "pixels": list(pixels.shape[-2:]), "finite": bool(torch.isfinite(pixels).all())}


def table(result: dict) -> str:
    kd, s = result["kd"], result["sampling"]
    peak = kd.get("peak_allocated_gib_per_gpu")
    rows = [
        (f"KD step (batch {result['batch_size']}, median of {len(kd['kd_step_all_s']) - result['warmup']})",
         f"{kd['kd_step_s']:.3f} s"),
        ("KD step peak memory (allocated / reserved)",
         f"{peak[0]:.2f} / {kd['peak_reserved_gib_per_gpu'][0]:.2f} GiB" if peak else "n/a (CPU)"),
    ]
    for name, r in s["images"].items():
        rows.append((f"{r['steps']}-step image, {r['pixels'][1]} x {r['pixels'][0]} ({PRESETS[name]}; decode included)",
                     f"{r['image_s']:.3f} s (decode {r['decode_s']:.3f} s)"))
    rows.append(("sampling peak memory", f"{s['peak_allocated_gib']:.2f} GiB" if s["peak_allocated_gib"] else "n/a (CPU)"))
    head = f"{result['device']}, {result['dtype']}: teacher {result['teacher_layers']} blocks, student {result['student_layers']}"
    return "\n".join([head, "", "| measurement | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/bench_image", help="where the random Wan folder is written once")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random Wan folder (seconds on a CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed KD steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed KD steps and images first")
    p.add_argument("--repeats", type=int, default=3, help="timed images of each sampler")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. batch_size=2")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"need --steps >= 1, --repeats >= 1 and --warmup >= 0, got {args.steps}, {args.repeats}, "
                         f"{args.warmup}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; pass --tiny --device cpu for the CPU path")
    root = Path(args.root) / ("tiny" if args.tiny else "wan1.3b")
    folder = wan_folder(root, args.tiny, device)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(prompts(8)) + "\n")
    common = [f"model.path={folder}", f"data.prompts.path={prompt_file}", f"device={args.device}",
              "total_batch_size=null", *(tiny_overrides() if args.tiny else []), *args.overrides]
    configs = {name: compose_checked([f"experiment={preset}", *common]) for name, preset in PRESETS.items()}
    cfg = configs["kd_50_steps"]
    dist = init_distributed("cpu" if device.type == "cpu" else None)
    own_group = single_process_group(dist)
    try:
        built = build_sharded(cfg, dist)
        method = built[1]
        sizes = {"teacher_layers": method.real_score.config.num_layers, "student_layers": method.generator.config.num_layers,
                 "student_params": sum(p.numel() for p in method.generator.parameters())}
        kd = bench(cfg, dist, args.steps, args.warmup, built=built)  # (a)
        generator = inference_generator(method, cfg, built[0])
        text_encoder, vae, latent_shape = method.text_encoder, method.vae, method.latent_shape
        del built, method  # (b) holds what inference holds: the student, the text encoder, the VAE
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        images = {name: time_image(Student(generator, text_encoder, vae, method_config(c), latent_shape),
                                   prompts(1)[0], args.repeats, args.warmup) for name, c in configs.items()}
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    finally:
        if own_group:
            destroy()
    result = {"device": kd["device"], "dtype": cfg.model.dtype, "latent_shape": list(latent_shape), **sizes,
              "batch_size": cfg.batch_size, "warmup": args.warmup, "overrides": args.overrides, "kd": kd,
              "sampling": {"images": images, "peak_allocated_gib": peak}}
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
