"""Evaluation: one or more students against their teacher on the same prompts and seeds, with scores
and a page to watch them (evaluate.py is the Hydra entry point).

Every student is loaded and checked the way inference.py does it (engine/inference.py `prepare`: the
checkpoint forms, prompts, num_frames) and generates through inference's `generate`, batched, with its
static KV caches and CUDA graphs reused from batch to batch. The teacher's rows come from
engine/validation.py `teacher_clips`: its Euler ODE with CFG from each item's student noise (item i is
(prompt, seed) in inference's order, noise key mix_seed(seed, 0, "eval", i)), so a teacher clip and a
student clip of one row start from the same noise, and inference.py reproduces a student's clip.
Clips are kept as uint8 frames (what the mp4 shows) and scored as they come (utils/video_metrics.py);
engine/evaluate_outputs.py writes the videos, metrics.json, drift.png and index.html. Everything that
can be wrong with the input is found before the first file is written.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from engine.build import BUILDERS, DTYPES
from engine.config import DataSchema, ModelSchema
from engine.inference import InferenceSchema, Plan, generate, prepare, summarise
from engine.items import Item
from engine.student import FP32_CAST_WARNING, run_config, without_log
from engine.validation import teacher_clips, teacher_guidance
from model.wan.attention import resolve_backend
from model.wan.transformer import WanDiT
from model.wan.weights import WeightMismatchError
from pipeline.ode import sigma_grid
from utils.distributed import log0, pick_device
from utils.speed import SpeedSchema, resolve_levers
from utils.tracker import ProgressBar
from utils.video import to_uint8
from utils import video_metrics as vm

log = logging.getLogger(__name__)

TEACHER = "teacher"  # the teacher's row name; a student may not take it


@dataclass
class TeacherSchema:
    enabled: bool = True  # generate the teacher's videos beside the students' (their distance needs them)
    steps: int = 50  # Euler steps of the teacher's ODE
    guidance_scale: Optional[float] = None  # CFG uncond + g (cond - uncond); null: 1 + method.guidance_scale
    negative_prompt: Optional[str] = None  # the CFG negative prompt; null: method.negative_prompt


@dataclass
class ClipSchema:
    weights: Optional[str] = None  # local CLIP weights: an open-clip folder or file, or a transformers CLIP folder
    model: str = "ViT-B-32"  # open-clip architecture of a weights file (a folder names its own)
    frames: Optional[int] = 8  # frames per clip for the text-video score, evenly spread (null: all)
    batch: int = 64  # frames per CLIP forward


@dataclass
class LpipsSchema:
    enabled: bool = True  # student-vs-teacher LPIPS, when the lpips package and its backbone weights are here
    net: str = "alex"  # alex | vgg | squeeze


@dataclass
class VBenchSchema:
    dimensions: List[str] = field(default_factory=lambda: list(vm.VBENCH_WEIGHTS))  # [] : none
    cache_dir: Optional[str] = None  # VBench's weights; null: $VBENCH_CACHE_DIR or ~/.cache/vbench


@dataclass
class EvaluateSchema:
    """Every evaluation knob and its default; configs/evaluate.yaml comments each one."""

    checkpoints: Any = MISSING
    names: Optional[List[str]] = None
    use_ema: Optional[bool] = None
    prompts: Any = None
    seed: Any = 0
    num_frames: Optional[int] = None
    batch_size: int = 4
    output_dir: Optional[str] = None
    overwrite: bool = False
    fps: int = 16
    videos: bool = True
    device: str = "auto"
    teacher: TeacherSchema = field(default_factory=TeacherSchema)
    clip: ClipSchema = field(default_factory=ClipSchema)
    lpips: LpipsSchema = field(default_factory=LpipsSchema)
    vbench: VBenchSchema = field(default_factory=VBenchSchema)
    speed: SpeedSchema = field(default_factory=SpeedSchema)
    method: Any = MISSING  # training's method group (describes a Self-Forcing .pt), as in inference.yaml
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateSchema)

# inference.yaml's keys that evaluate.yaml shares: each student is prepared as inference.py would be
SHARED = ("use_ema", "prompts", "seed", "num_frames", "batch_size", "device", "speed", "method", "model", "data")
# What a run writes into its output directory; overwrite=true removes only these.
OUTPUTS = ("metrics.json", "index.html", "drift.png", "videos", "side_by_side", "vbench")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Row:
    """One model's videos of every item, their scores and speed."""

    name: str
    info: dict  # what made them: checkpoint and weights, or the teacher's steps and CFG
    clips: list = field(default_factory=list)  # uint8 [F, H, W, 3] per item
    scores: list = field(default_factory=list)  # {score: value} per item
    curves: list = field(default_factory=list)  # {score: [F or F - 1] tensor} per item
    speed: dict = field(default_factory=dict)


@dataclass
class Scorers:
    clip: Any  # vm.ClipScorer or None
    lpips: Any  # distance(frames, reference) or None
    skipped: dict  # score -> the one-line reason it did not run


# ---------------------------------------------------------------------------- the input
def checkpoint_list(cfg: DictConfig) -> list[str]:
    value = cfg.checkpoints
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"checkpoints must be a checkpoint path or a non-empty list of them, got {value!r}")
    return value


def row_names(cfg: DictConfig, checkpoints: list[str]) -> list[str]:
    """names, or one per checkpoint from its path (an export file: its step directory's name)."""
    if cfg.names is not None:
        names = list(cfg.names)
        if len(names) != len(checkpoints):
            raise ValueError(f"names has {len(names)} entries for {len(checkpoints)} checkpoints; give one per checkpoint or null")
    else:
        names = []
        for c in checkpoints:
            p = Path(c.rstrip("/"))
            p = p.parent.parent if p.parent.name == "export" else p  # <step>/export/model.safetensors
            names.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", p.stem).strip("-.") or "student")
        names = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not NAME.fullmatch(name) or name == TEACHER:
            raise ValueError(f"names[{i}]={name!r}: a row name is letters, digits, '_', '-' or '.', and not '{TEACHER}'")
    if len(set(names)) != len(names):
        raise ValueError(f"names must differ from each other, got {names}")
    return names


def inference_config(cfg: DictConfig, checkpoint: str) -> DictConfig:
    """An inference config (InferenceSchema: its defaults for every key evaluate.yaml does not share) for one
    checkpoint: what engine/inference.py `prepare` reads, and what inference.py would run."""
    return OmegaConf.merge(OmegaConf.structured(InferenceSchema), {"checkpoint": checkpoint, **{k: cfg[k] for k in SHARED}})


def check_settings(cfg: DictConfig) -> None:
    for key, ok, want in (("teacher.steps", cfg.teacher.steps >= 1, ">= 1"), ("fps", cfg.fps >= 1, ">= 1"),
                          ("clip.frames", cfg.clip.frames is None or cfg.clip.frames >= 1, ">= 1 or null"),
                          ("clip.batch", cfg.clip.batch >= 1, ">= 1")):
        if not ok:
            raise ValueError(f"{key} must be {want}, got {OmegaConf.select(cfg, key)}")
    if cfg.videos:
        try:
            import imageio_ffmpeg  # noqa: F401  (imageio's mp4 writer)
        except ImportError:
            raise ValueError("videos=true writes mp4 files through imageio-ffmpeg, which is not installed: "
                             "pip install imageio-ffmpeg, or pass videos=false for the scores alone") from None
    unknown = [d for d in cfg.vbench.dimensions if d not in vm.VBENCH_WEIGHTS]
    if unknown:
        raise ValueError(f"vbench.dimensions has {unknown}; the dimensions that take any prompt are {list(vm.VBENCH_WEIGHTS)}")


def prepare_students(cfg: DictConfig, overrides: list[str], device: torch.device) -> list[Plan]:
    """Each checkpoint's Plan (its student built and every input checked), all agreeing on items and clip shape."""
    plans = []
    for checkpoint in checkpoint_list(cfg):
        try:
            plan = prepare(inference_config(cfg, checkpoint), overrides, device)
        except WeightMismatchError as e:  # a checkpoint of another model size: its list of keys in one line
            first = str(e).splitlines()
            raise ValueError(f"checkpoint={checkpoint} does not fit the model its config describes (another model "
                             f"size?): {' '.join(s.strip() for s in first[1:3])}; pass the model it was trained with "
                             "(model=... for a .pt)") from None
        plans.append(plan)
        first = plans[0]
        if plan is not first:
            same = {"items": [(i.prompt, i.seed) for i in plan.items] == [(i.prompt, i.seed) for i in first.items],
                    "num_frames": plan.num_frames == first.num_frames,
                    "latent shape": plan.student.latent_shape == first.student.latent_shape,
                    "VAE": type(plan.student.vae) is type(first.student.vae)}
            differ = [k for k, ok in same.items() if not ok]
            if differ:
                raise ValueError(f"checkpoint={checkpoint} differs from checkpoint={first.source.path} in {', '.join(differ)}; "
                                 "the rows of one evaluation share prompts, frames and the teacher: pass num_frames=, "
                                 "prompts= or evaluate them separately")
    vae = plans[0].student.vae
    pixel_frames = 1 + vae.temporal_compression * (plans[0].num_frames - 1)
    if pixel_frames < 2:
        raise ValueError(f"num_frames={plans[0].num_frames} gives {pixel_frames} frame; flicker and consistency need 2 or more")
    return plans


def build_teacher(cfg: DictConfig, plan: Plan, overrides: list[str], device: torch.device):
    """The first checkpoint's teacher (model.teacher or model.teacher_path), frozen, with inference's DiT levers."""
    node = run_config(inference_config(cfg, str(plan.source.path)), plan.source, overrides)
    teacher = BUILDERS["teacher"](node, {}).eval().requires_grad_(False).to(device)
    if isinstance(teacher, WanDiT):  # as engine/build.py sets a frozen teacher up, with inference's kernel levers
        dtype = DTYPES[node.model.dtype]
        levers = resolve_levers(cfg.speed, device, node.model.attention_backend)
        with without_log(*FP32_CAST_WARNING):  # WanDiT computes its float32 parts itself (engine/student.py)
            teacher.to(dtype=dtype)
        teacher.set_attention_backend("fa4" if levers["fa4_attention"] else resolve_backend(node.model.attention_backend, device, dtype))
        teacher.set_fused_elementwise(levers["fused_elementwise"])
    return teacher


def load_scorers(cfg: DictConfig, device: torch.device, with_teacher: bool) -> Scorers:
    skipped = {}
    try:
        clip = vm.load_clip(cfg.clip.weights, cfg.clip.model, device)
    except (FileNotFoundError, ValueError, ImportError) as e:
        clip, skipped["clip"] = None, f"CLIP scores (clip_score, consistency) skipped: {e}"
    lpips = None
    if not with_teacher:
        skipped["lpips"] = "LPIPS skipped: teacher.enabled=false (it compares students with the teacher)"
    elif not cfg.lpips.enabled:
        skipped["lpips"] = "LPIPS skipped: lpips.enabled=false"
    else:
        lpips, reason = vm.load_lpips(cfg.lpips.net, device)
        if reason:
            skipped["lpips"] = reason
    for reason in skipped.values():
        log0("%s", reason, level=logging.WARNING)
    return Scorers(clip, lpips, skipped)


def earlier_outputs(out_dir: Path) -> list[Path]:
    return [out_dir / name for name in OUTPUTS if (out_dir / name).exists()]


# ---------------------------------------------------------------------------- generation and scores
def score_clip(row: Row, clip: np.ndarray, item: Item, scorers: Scorers, cfg: DictConfig, device, reference=None) -> None:
    """Score one uint8 clip and append it, its scores and curves to the row."""
    frames = vm.unit_frames(clip, device)
    flicker = vm.flicker_by_frame(frames)
    scores, curves = {"flicker": flicker.mean().item()}, {"flicker": flicker.cpu()}
    if scorers.clip is not None:
        c = vm.clip_scores(scorers.clip, frames, item.prompt, cfg.clip.frames, cfg.clip.batch)
        scores |= {"clip_score": c.clip_score, "consistency": c.consistency}
        curves |= {"clip_score": c.clip_score_by_frame, "consistency": c.consistency_by_frame}
    if reference is not None:
        ref = vm.unit_frames(reference, device)
        scores["psnr_vs_teacher"] = vm.psnr(frames, ref)
        if scorers.lpips is not None:
            scores["lpips_vs_teacher"] = scorers.lpips(frames, ref)
    row.clips.append(clip)
    row.scores.append(scores)
    row.curves.append(curves)


def batches(items: list[Item], size: int):
    for b in range(0, len(items), size):
        yield items[b : b + size]


def teacher_row(cfg: DictConfig, teacher, plan: Plan, scorers: Scorers, bar, device) -> Row:
    student = plan.student  # encodes the prompts and decodes the latents, as for the students
    guidance = teacher_guidance(cfg.teacher.guidance_scale, student.cfg)
    negative = student.cfg.negative_prompt if cfg.teacher.negative_prompt is None else cfg.teacher.negative_prompt
    uncond = student.encode([negative]) if guidance != 1.0 else None
    sigmas = sigma_grid(cfg.teacher.steps, student.cfg.timestep_shift)
    row = Row(TEACHER, {"steps": cfg.teacher.steps, "guidance_scale": guidance, "negative_prompt": negative})
    frames = seconds = 0.0
    for batch in batches(plan.items, cfg.batch_size):
        _sync(device)
        start = time.perf_counter()
        pixels = teacher_clips(teacher, student, student.vae, batch, plan.num_frames, sigmas, uncond, guidance)
        seconds += time.perf_counter() - start  # teacher_clips ends on the host: synchronised
        frames += pixels.shape[0] * pixels.shape[1]
        for k, item in enumerate(batch):
            score_clip(row, to_uint8(pixels[k]), item, scorers, cfg, device)
        bar.update(bar.bar.n + len(batch))
    row.speed = {"throughput_fps": frames / seconds, "generation_s": seconds, "frames": int(frames), "device": str(device)}
    return row


def student_row(name: str, cfg: DictConfig, plan: Plan, scorers: Scorers, bar, device, teacher: Row | None) -> Row:
    trained = plan.student.cfg.num_training_frames
    row = Row(name, {"checkpoint": str(plan.source.path), "weights": plan.source.weights, "training_frames": trained,
                     "training_pixel_frames": 1 + plan.student.vae.temporal_compression * (trained - 1)})
    timings = []
    for batch in batches(plan.items, cfg.batch_size):
        _, pixels, timing = generate(plan.student, batch, plan.num_frames)
        timings.append(timing | {"frames": pixels.shape[0] * pixels.shape[1]})
        for k, item in enumerate(batch):
            reference = teacher.clips[item.index] if teacher is not None else None
            score_clip(row, to_uint8(pixels[k]), item, scorers, cfg, device, reference)
        bar.update(bar.bar.n + len(batch), {"first_chunk_s": timing["first_chunk_s"]})
    row.speed = summarise(timings, [timings], device)
    if len(timings) > 1:  # the first batch also compiles and captures graphs on the GPU
        later = timings[1:]
        row.speed["throughput_fps_after_first_batch"] = sum(t["frames"] for t in later) / sum(t["seconds"] for t in later)
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- the whole run
def run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] = ()) -> dict:
    """Evaluate every checkpoint of `cfg` against the teacher; returns metrics.json's content.

    `overrides`: the command line's model / method / data overrides (engine/student.py group_overrides)."""
    from engine import evaluate_outputs as outputs

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("evaluate.py runs in one process (it batches prompts instead); start it with python, not torchrun")
    check_settings(cfg)
    device = pick_device(cfg)
    out_dir = Path(output_dir)
    earlier = earlier_outputs(out_dir)
    if earlier and not cfg.overwrite:
        raise ValueError(f"output_dir={out_dir} already holds an evaluation ({', '.join(p.name for p in earlier)}); "
                         "pass overwrite=true to replace it, or choose another output_dir")
    start = time.perf_counter()
    names = row_names(cfg, checkpoint_list(cfg))
    plans = prepare_students(cfg, list(overrides), device)  # bad input stops here, before anything is written
    teacher = build_teacher(cfg, plans[0], list(overrides), device) if cfg.teacher.enabled else None
    scorers = load_scorers(cfg, device, teacher is not None)
    items = plans[0].items
    log0("%d checkpoints%s, %d videos each of %d latent frames -> %s", len(plans),
         f" and the teacher ({cfg.teacher.steps} steps)" if teacher is not None else "", len(items), plans[0].num_frames, out_dir)
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    wall = {"load_s": time.perf_counter() - start}  # where the run's time went, generation and scores included
    bar = ProgressBar(total=len(items) * (len(plans) + (teacher is not None)))
    try:
        if teacher is not None:
            mark = time.perf_counter()
            rows.append(teacher_row(cfg, teacher, plans[0], scorers, bar, device))
            wall["teacher_s"] = time.perf_counter() - mark
            del teacher  # its memory goes back before the students' caches are allocated
            if device.type == "cuda":
                torch.cuda.empty_cache()
        mark = time.perf_counter()
        for name, plan in zip(names, plans):
            rows.append(student_row(name, cfg, plan, scorers, bar, device, rows[0] if rows and rows[0].name == TEACHER else None))
        wall["students_s"] = time.perf_counter() - mark
    finally:
        bar.close()
    return outputs.write_all(out_dir, cfg, plans, rows, scorers, device, wall, start)
