"""Periodic evaluation: sample clips with the (EMA) generator through the inference rollout, score
them against the toy world's ground truth, and write a labelled sample grid.

An image student (a WanImageDiT generator, model/image_kd.py `is_image_student`) has no rollout: it samples
one-frame images by `sample_images`, the sampler inference.py and the validation images use, scored against
the world's one-frame templates."""

from __future__ import annotations

from pathlib import Path

import torch

from model.base import SelfForcingModel
from model.image_kd import is_image_student, sample_images
from pipeline.rollout import rollout
from utils.sample_rng import SampleRNG


# The noise key of evaluation samples: sample i draws from SampleRNG.for_samples(seed, EVAL_STEP,
# EVAL_PHASE, [i]). inference.py uses the same key, so it reproduces training's evaluation samples.
EVAL_STEP, EVAL_PHASE = 0, "eval"


@torch.no_grad()
def sample(method: SelfForcingModel, generator, prompts: list[str], num_frames: int, seed: int) -> torch.Tensor:
    """Clips [N, F, C, H, W] in pixel space, noise keyed by (seed, sample index)."""
    rng = SampleRNG.for_samples(seed, EVAL_STEP, EVAL_PHASE, list(range(len(prompts))), method.device)
    return sample_with(method, generator, prompts, num_frames, rng)


@torch.no_grad()
def sample_with(method: SelfForcingModel, generator, prompts: list[str], num_frames: int, rng: SampleRNG) -> torch.Tensor:
    """Clips [N, F, C, H, W] in pixel space through the inference rollout; sample i draws from rng's stream i.
    An image student's are one-frame images from inference.py's image sampler (the same draws)."""
    if is_image_student(generator):
        if num_frames != 1:
            raise ValueError(f"an image student (WanImageDiT) makes one frame, asked for {num_frames}")
        return sample_images(method, generator, prompts, rng)[1]
    noise = rng.randn((len(prompts), num_frames, *method.latent_shape))
    pattern = method.pattern_for(num_frames)
    out = rollout(
        generator, noise, method.encode(prompts), method.steps, pattern, schedule=method.schedule,
        context_noise=method.cfg.context_noise, rng=rng,
    )
    return method.vae.decode(out.video).float().cpu()


def evaluate_toy(method, generator, data_cfg, step: int, seed: int, run_dir: Path, num_frames: int,
                 teacher: bool = False, video_formats=("mp4", "gif"), write: bool = True) -> dict:
    """Toy-world metrics at the training length and at metrics.long_num_frames; a grid video.

    teacher=True scores the exact teacher's own samples instead (metrics.teacher_steps Euler steps,
    no guidance: its conditional is exact), the reference row a student is read against.
    Under FSDP every rank calls this (the generator's forwards are collectives), with write=True on one.
    An image student is scored at one frame (both lengths 1: the long_ keys repeat the scores) with a PNG grid.
    """
    from engine.inference import write_png
    from utils.toy_metrics import append_jsonl, evaluate, match_rule, sample_teacher
    from utils.video import grid_video, write_video

    world, metrics_cfg = method.real_score.world, data_cfg.metrics
    prompts = [p for p in world.prompts for _ in range(metrics_cfg.samples_per_prompt)]
    record = {"step": step, "source": f"exact_teacher_{metrics_cfg.teacher_steps}_steps" if teacher else "student"}
    lengths = {"": num_frames, "long_": metrics_cfg.long_num_frames}
    image = is_image_student(method.generator)
    if image and set(lengths.values()) != {1}:
        raise ValueError(f"an image student (WanImageDiT) makes one frame, but the toy evaluation asks for {num_frames} "
                         f"(eval.num_frames) and {metrics_cfg.long_num_frames} (data.metrics.long_num_frames): set "
                         "data.metrics.long_num_frames=1 and leave eval.num_frames null")
    for prefix, frames in lengths.items():
        if not prefix or frames != num_frames:  # a long length equal to the training length: the same draws and scores
            if teacher:
                clips = sample_teacher(method.real_score, method.text_encoder, prompts, frames, metrics_cfg.teacher_steps,
                                       shift=method.cfg.timestep_shift, generator=torch.Generator().manual_seed(seed))
            else:
                clips = sample(method, generator, prompts, frames, seed)
            scores = evaluate(clips, prompts, world, **match_rule(metrics_cfg))
        record.update({f"{prefix}{k}": v for k, v in scores.items() if k != "coverage_per_prompt"})
        if prefix == "" and not teacher and write:
            first = clips[:: metrics_cfg.samples_per_prompt]
            grid = grid_video(first, world.prompts, title=f"step {step}")
            if image:  # one frame: a picture, as the validation images are
                write_png(run_dir / "samples" / f"step_{step:06d}.png", grid[0])
            for ext in () if image else video_formats:
                write_video(run_dir / "samples" / f"step_{step:06d}.{ext}", grid)
    if write:
        append_jsonl(run_dir / "metrics.jsonl", record)
    return record
