"""Project a Wan video teacher onto an image student (method=image_kd's init option, written out) and report
how much of the teacher's one-frame prediction the projected student keeps before any training.

The training config says everything, as for a run (experiment=image_kd and overrides): the teacher is
model.teacher_path, the student's size model.backbone, the teacher blocks method.teacher_blocks (null: evenly
spaced), the width rule method.width_rule; the projection is model/image_kd.py build_image_student's, so the
folder written equals the student a run with method.project_init=true starts from. Written to --out:
config.json + diffusion_pytorch_model.safetensors (diffusers format: WanImageDiT.from_pretrained, or
model.generator_init=<out> with method.project_init=false) and projection.json with the numbers.

The numbers: ||v_student - v_teacher|| / ||v_teacher|| of the flow on random one-frame latents of
model.latent_shape and random text contexts of model.text_encoder.text_len tokens, per timestep and averaged,
for the projected student and for a random-initialised one of the same size (the reference: ~1 or more).

    python scripts/project_weights.py --out students/half experiment=image_kd model.path=<Wan folder>
    python scripts/project_weights.py --out students/narrow --device cuda experiment=image_kd \\
        model.backbone.num_attention_heads=8 model.backbone.ffn_dim=6144
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import compose_checked, method_class  # noqa: E402
from model.image_kd import ImageKD, _backbone, build_image_student, check_projectable, prediction_error  # noqa: E402
from model.wan.transformer import WanImageDiT  # noqa: E402
from model.wan.weights import load_backbone  # noqa: E402
from utils.errors import one_line_errors  # noqa: E402


def project(overrides: list[str], out: str | Path | None, device: str = "cpu", samples: int = 2, seed: int = 0) -> dict:
    """Build the projected student of the composed config, measure it, write it under `out` (None: do not write)."""
    cfg = compose_checked(overrides)
    m, method = cfg.model, cfg.method
    if not issubclass(method_class(cfg), ImageKD):
        raise ValueError(f"method._target_={cfg.method._target_}: the projection is method=image_kd's (experiment=image_kd)")
    if not method.project_init or m.generator_init is not None:
        raise ValueError("the projection is the student's start with method.project_init=true and "
                         "model.generator_init=null; set those")
    start = time.perf_counter()
    teacher = load_backbone(m.teacher_path).eval().requires_grad_(False)
    torch.manual_seed(seed)
    student = build_image_student(cfg, {"teacher": teacher}).eval().requires_grad_(False)
    teacher_cfg = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    blocks = check_projectable(teacher_cfg, _backbone(cfg), None if method.teacher_blocks is None else list(method.teacher_blocks))
    seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    random = WanImageDiT(**_backbone(cfg)).eval().requires_grad_(False)  # diffusers' initialisation
    target = torch.device(device)
    teacher, student, random = (net.to(target) for net in (teacher, student, random))
    args = (tuple(m.latent_shape), int(m.text_encoder.text_len))
    report = {
        "teacher": str(m.teacher_path), "teacher_layers": teacher.config.num_layers,
        "teacher_heads": teacher.config.num_attention_heads, "teacher_ffn_dim": teacher.config.ffn_dim,
        "student_layers": student.config.num_layers, "student_heads": student.config.num_attention_heads,
        "student_ffn_dim": student.config.ffn_dim, "teacher_blocks": blocks, "width_rule": method.width_rule,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "latent_shape": list(args[0]), "text_len": args[1], "samples": samples, "seed": seed, "device": str(target),
        "projection_seconds": seconds,
        "projected": prediction_error(teacher, student, *args, samples=samples, seed=seed),
        "random_init": prediction_error(teacher, random, *args, samples=samples, seed=seed),
    }
    if out is not None:
        out = Path(out)
        student.to("cpu").save_pretrained(out)
        (out / "projection.json").write_text(json.dumps(report, indent=2))
        report["out"] = str(out)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Further arguments are training config overrides (experiment=image_kd ...).")
    parser.add_argument("--out", default=None, help="folder to write the student to (diffusers format); none: report only")
    parser.add_argument("--device", default="cpu", help="where the error is measured (cpu, cuda)")
    parser.add_argument("--samples", type=int, default=2, help="random inputs per timestep")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    with one_line_errors(None, hint="HYDRA_FULL_ERROR=1"):
        report = project(overrides, args.out, args.device, args.samples, args.seed)
    p, r = report["projected"], report["random_init"]
    print(f"student: {report['student_layers']} blocks (teacher blocks {report['teacher_blocks']}), "
          f"{report['student_heads']}/{report['teacher_heads']} heads, {report['student_ffn_dim']}/"
          f"{report['teacher_ffn_dim']} ffn units ({report['width_rule']}); {report['student_parameters']:,} of "
          f"{report['teacher_parameters']:,} parameters")
    print(f"one-frame flow, relative error to the teacher: projected {p['relative_error']:.4g}, random init "
          f"{r['relative_error']:.4g}")
    print("  per timestep (projected): " + ", ".join(f"t={t:g}: {e:.4g}" for t, e in p["per_timestep"].items()))
    if "out" in report:
        print(f"written to {report['out']} (config.json, diffusion_pytorch_model.safetensors, projection.json)")
    return report


if __name__ == "__main__":
    main()
