"""What inference makes, read and checked before anything runs: items (prompt, seed, file stem, noise key) from
`prompts=` (a list, a .txt file, the toy world's prompts) and `seed=`; timelines (a .yaml / .yml file of
{start: <seconds>, prompt: <text>} entries, placed on chunk boundaries); `init_video=` / `init_image=` frames,
`noise=` files and `num_frames` against the student. Every problem is one error naming the key
(engine/inference.py runs the items)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from engine.evaluation import EVAL_PHASE, EVAL_STEP  # training's evaluation noise key
from model.base import MethodConfig
from pipeline.rollout import chunk_starts
from utils.data import PromptFile
from utils.sample_rng import mix_seed


@dataclass(frozen=True)
class Item:
    index: int  # position in the run: prompts in order, each with every seed in order
    prompt: str
    seed: int
    stem: str  # file name without extension
    timeline: tuple = ()  # ((start seconds, prompt), ...) of a timeline item; () for a plain prompt

    @property
    def noise_key(self) -> int:
        # = SampleRNG.for_samples(seed, 0, "eval", [index]).generators[0]'s seed: training's evaluation key
        return mix_seed(self.seed, EVAL_STEP, EVAL_PHASE, self.index)


def read_prompts(prompts: Any, world=None, samples_per_prompt: int = 1) -> list[str]:
    """A .txt file (one prompt per line), a list, or one prompt; null on the toy world: the evaluation's list."""
    if OmegaConf.is_config(prompts):
        prompts = OmegaConf.to_container(prompts)
    if prompts is None:
        if world is None:
            raise ValueError("prompts is required: a .txt file with one prompt per line, or prompts=[p1, p2]")
        return [p for p in world.prompts for _ in range(samples_per_prompt)]
    if isinstance(prompts, str):
        if prompts.endswith(".txt") or Path(prompts).is_file():
            return PromptFile(prompts).prompts  # training's prompt-file reader, with its errors
        prompts = [prompts]
    found = [str(p).strip() for p in prompts if str(p).strip()]
    if not found:
        raise ValueError("prompts is an empty list; expected a .txt file with one prompt per line or prompts=[p1, p2]")
    return found


def read_seeds(seed: Any) -> list[int]:
    seeds = OmegaConf.to_container(seed) if OmegaConf.is_config(seed) else seed
    seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a non-empty list of ints, got {seed!r}")
    return list(seeds)


def slug(prompt: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:length].strip("-") or "prompt"


def make_items(prompts: list[str], seeds: list[int]) -> list[Item]:
    pairs = [(p, s) for p in prompts for s in seeds]
    width = max(4, len(str(len(pairs) - 1)))  # zero-padded, so names sort in index order
    return [Item(i, p, s, f"{i:0{width}d}_{slug(p)}_seed{s}") for i, (p, s) in enumerate(pairs)]


TIMELINE_SUFFIXES = (".yaml", ".yml")
TIMELINE_FORM = "a list of {start: <seconds>, prompt: <text>} entries (or a list of such lists, one video each)"


def is_timeline(prompts: Any) -> bool:
    """prompts= names a YAML timeline file (by its suffix)."""
    return isinstance(prompts, str) and Path(prompts).suffix.lower() in TIMELINE_SUFFIXES


def read_timelines(path: str) -> list[tuple[tuple[float, str], ...]]:
    """The timelines of a YAML file, each ((start seconds, prompt), ...): starting at 0, starts increasing."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompts={path} does not exist; expected a YAML timeline: {TIMELINE_FORM}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"prompts={path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompts={path} holds no timeline; expected {TIMELINE_FORM}")
    several = all(isinstance(t, list) for t in data)
    timelines = data if several else [data]
    return [_timeline(t, f"prompts={path}" + (f" timeline {i}" if several else "")) for i, t in enumerate(timelines)]


def _timeline(entries: list, where: str) -> tuple[tuple[float, str], ...]:
    if not entries:
        raise ValueError(f"{where} is empty; expected {TIMELINE_FORM}")
    out: list[tuple[float, str]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"start", "prompt"}:
            shown = repr(entry) if len(repr(entry)) <= 60 else repr(entry)[:57] + "..."
            raise ValueError(f"{where}: entry {i} is {shown}; expected {{start: <seconds>, prompt: <text>}} (those two keys)")
        start, prompt = entry["start"], entry["prompt"]
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not math.isfinite(start) or start < 0:
            raise ValueError(f"{where}: entry {i} has start {start!r}; expected seconds >= 0")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: entry {i} (start {start} s) has an empty prompt")
        if i == 0 and start != 0:
            raise ValueError(f"{where}: the first entry starts at {start} s; a timeline starts at 0 (the first frames' prompt)")
        if out and start <= out[-1][0]:
            raise ValueError(f"{where}: entry {i} starts at {start} s, not after entry {i - 1} ({out[-1][0]:g} s): "
                             "starts must increase (unsorted or overlapping entries)")
        out.append((float(start), prompt.strip()))
    return tuple(out)


def place_timeline(timeline: tuple, total_frames: int, context: int, pattern, temporal_compression: int, fps: float,
                   where: str) -> list[tuple[int, str]]:
    """Each entry's (first latent frame, prompt): the first chunk whose first frame is at or after its start."""
    def seconds(frame: int) -> float:
        return (0 if frame == 0 else 1 + temporal_compression * (frame - 1)) / fps

    starts = chunk_starts(pattern, total_frames)
    length = seconds(total_frames)  # the frame after the last one: the video's length
    placed = [(0, timeline[0][1])]
    for i, (start, prompt) in enumerate(timeline[1:], 1):
        if start >= length:
            raise ValueError(f"{where}: entry {i} starts at {start:g} s, past the end of the {length:g} s video "
                             f"({total_frames} latent frames); raise num_frames or duration, or move the entry")
        frame = next((f for f in starts if seconds(f) >= start - 1e-9), None)
        if frame is None:
            raise ValueError(f"{where}: entry {i} starts at {start:g} s, after the last chunk's start "
                             f"({seconds(starts[-1]):g} s): a prompt takes over at a chunk's first frame")
        if frame < context:
            raise ValueError(f"{where}: entry {i} starts at {start:g} s, inside the init frames (the first "
                             f"{seconds(context):g} s): the first generated chunk starts there")
        if frame == placed[-1][0]:
            raise ValueError(f"{where}: entries {i - 1} and {i} take over at the same chunk (latent frame {frame}, "
                             f"{seconds(frame):g} s): move them apart")
        placed.append((frame, prompt))
    return placed


def frames_for_duration(duration: float, fps: float, pattern, temporal_compression: int) -> int:
    """The fewest latent frames, a whole number of blocks, whose video lasts at least `duration` seconds."""
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
        raise ValueError(f"duration={duration!r} must be a positive number of seconds")
    pixels = math.ceil(duration * fps - 1e-9)
    frames = 1 + max(0, math.ceil((pixels - 1) / temporal_compression))
    while True:
        try:
            pattern.check_clip(frames)
            return frames
        except ValueError:
            frames += 1


def read_frames(path: str, key: str) -> torch.Tensor:
    """An image or a video file as pixels [F, 3, H, W] float32 in [-1, 1] (alpha dropped, grey made RGB)."""
    import imageio.v3 as iio

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist; expected {'a video file (mp4)' if key == 'init_video' else 'an image file (png, jpg)'}")
    try:  # a video [F, H, W, C]; an image [H, W(, C)], made one frame
        frames = np.asarray(iio.imread(p, index=None)) if key == "init_video" else np.asarray(iio.imread(p))[None]
    except Exception as e:  # the reader's own message, on one line
        raise ValueError(f"{key}={path} could not be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if frames.ndim == 3:  # grey frames [F, H, W]
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or frames.dtype != np.uint8:
        raise ValueError(f"{key}={path} holds {frames.dtype} pixels of shape {frames.shape}; expected 8-bit RGB frames")
    x = torch.from_numpy(frames[..., :3].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def check_num_frames(num_frames: int, student_cfg: MethodConfig, backbone: dict) -> None:
    try:
        student_cfg.pattern.check_clip(num_frames)
    except ValueError as e:
        raise ValueError(f"num_frames={num_frames} is impossible for this checkpoint: {e}") from None
    if num_frames > backbone["rope_max_seq_len"]:
        raise ValueError(f"num_frames={num_frames} exceeds the backbone's rope_max_seq_len={backbone['rope_max_seq_len']}")


def read_noise(path: str, shape: tuple) -> torch.Tensor:
    """Initial noise [N, F, C, H, W] from a torch file (a tensor or {"noise": tensor}) or safetensors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"noise={path} does not exist; expected a torch or safetensors file of [N, F, C, H, W]")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(p))
    else:
        data = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        data = data.get("noise", next(iter(data.values())) if len(data) == 1 else None)
    if not isinstance(data, torch.Tensor) or tuple(data.shape) != tuple(shape):
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"noise={path} holds {got}; expected a tensor (or {{'noise': tensor}}) of shape {tuple(shape)} = "
                         "[items (prompts x seeds), num_frames, C, H, W]")
    return data.float()
