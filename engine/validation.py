"""Validation videos of any model during training: the (EMA) generator on a fixed prompt file and
seeds at every evaluation, and the teacher's videos of the same prompts and seeds once per run.

Video i is (prompts[i // len(seeds)], seeds[i % len(seeds)]) and draws its noise from the stream
SampleRNG([mix_seed(seed, EVAL_STEP, EVAL_PHASE, i)]): inference.py's item order and noise key
(engine/inference.py make_items), so a prompt and seed start from the same noise at every
evaluation, in the teacher's video too, and `inference.py` with the same prompts and seeds draws it
as well. The student runs the inference rollout (engine/evaluation.py sample_with); the teacher its
Euler ODE with CFG (pipeline/ode.py euler_sample, the sampler of ODE pairs and of the toy reference
row). Both decode with the method's VAE. Every rank generates every video, because the sharded
forwards are collectives; rank 0 writes them one by one, so no rank holds more than one full clip.

    <run>/samples/step_XXXXXX/p00_s0.mp4 ...   one per prompt and seed
    <run>/samples/step_XXXXXX/grid.mp4         all of them tiled, a row per prompt, a column per seed
    <run>/samples/step_XXXXXX/index.json       file, prompt, seed of each; step, frames, weights
    <run>/samples/teacher/...                  the same for the teacher; its index.json holds the settings

An image student (model/image_kd.py, a WanImageDiT) writes p00_s0.png instead, sampled by `sample_images` (which
evaluation.py `sample_with` calls for it) from the same noise key, and grid.png shows each of its images beside
the teacher's of the same prompt and seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from engine.evaluation import sample_with
from engine.inference import read_png, write_png
from engine.items import Item, make_items
from model.image_kd import is_image_student
from pipeline.ode import euler_sample, sigma_grid
from utils.distributed import broadcast_object, log0
from utils.sample_rng import SampleRNG
from utils.video import grid_video, to_uint8, write_video

GRID_CELL = 416  # longest side of a grid cell in pixels: Wan's 832 x 480 halved, 16 x 16 toy clips upscaled
LABEL_CHARS = 60  # prompt characters in a grid label; index.json holds the whole prompt
# The files this module writes into a samples folder; only these are removed when it is rewritten.
OWN_FILE = re.compile(r"p\d+_s-?\d+\.(mp4|png)|grid\.(mp4|png)|index\.json")


def read_eval_prompts(path: str) -> list[str]:
    """One prompt per line, blank lines skipped; a missing or empty file is an error naming eval.prompts."""
    file = Path(path).expanduser()
    if not file.is_file():
        where = "" if file.is_absolute() else f" (a relative path: looked for in {Path.cwd()})"
        raise FileNotFoundError(f"eval.prompts={path} does not exist{where}; expected a text file with one prompt "
                                "per line, or eval.prompts=null for no validation videos")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"eval.prompts={path} holds no prompts (it is empty or has only blank lines); expected one "
                         "prompt per line, or eval.prompts=null for no validation videos")
    return prompts


class ValidationVideos:
    """The validation prompts and seeds of a run, and where their videos go."""

    def __init__(self, cfg: DictConfig, run_dir: Path, num_frames: int, write: bool):
        ev = cfg.eval
        self.cfg, self.num_frames, self.write = cfg, num_frames, write
        self.prompts = read_eval_prompts(ev.prompts)
        self.seeds = list(ev.seeds)
        self.items: list[Item] = make_items(self.prompts, self.seeds)
        width = max(2, len(str(len(self.prompts) - 1)))
        self.names = [f"p{it.index // len(self.seeds):0{width}d}_s{it.seed}" for it in self.items]
        self.root = Path(run_dir) / "samples"

    def check_prompts(self, text_encoder) -> None:
        """Prompts the text encoder refuses are named at start, not at the first evaluation."""
        if hasattr(text_encoder, "check_prompts"):
            try:
                text_encoder.check_prompts(self.prompts)
            except ValueError as e:
                raise ValueError(f"eval.prompts={self.cfg.eval.prompts}: {e}") from None

    # ------------------------------------------------------------------ the student
    @torch.no_grad()
    def student(self, method, generator, step: int, weights: str, tracker) -> None:
        """The generator's videos at `step` (called on every rank; `weights`: "ema" or "generator")."""

        image = is_image_student(generator)

        def make(item: Item) -> torch.Tensor:
            # one video per rollout: at Wan size the KV cache of a 21-frame clip is several GB a sample
            rng = SampleRNG([item.noise_key], method.device)
            return sample_with(method, generator, [item.prompt], self.num_frames, rng)[0]

        folder = self.root / f"step_{step:06d}"
        self._generate(folder, make, f"step {step} ({weights})", {"step": step, "weights": weights}, tracker, step,
                       "samples", image)

    # ------------------------------------------------------------------ the teacher
    def teacher_settings(self, method) -> dict:
        """What the teacher's videos depend on: they are made again only when one of these changes."""
        ev, model = self.cfg.eval, self.cfg.model
        return {
            "prompts": self.prompts, "seeds": self.seeds, "num_frames": self.num_frames,
            "latent_shape": list(method.latent_shape), "teacher_steps": ev.teacher_steps,
            "guidance_scale": self.teacher_guidance(method), "negative_prompt": self.negative_prompt(method),
            "timestep_shift": method.cfg.timestep_shift,
            "teacher": str(model.teacher_path if model.teacher is None else model.teacher.get("_target_")),
        }

    def teacher_guidance(self, method) -> float:
        return teacher_guidance(self.cfg.eval.teacher_guidance_scale, method.cfg)

    def negative_prompt(self, method) -> str:
        negative = self.cfg.eval.negative_prompt
        return method.cfg.negative_prompt if negative is None else negative

    def teacher_done(self, method) -> bool:
        """Rank 0's answer on every rank: the teacher's videos of these settings are all on disk."""
        done = None
        if self.write:
            folder = self.root / "teacher"
            try:
                index = json.loads((folder / "index.json").read_text())
            except (OSError, ValueError):
                index = {}
            index = index if isinstance(index, dict) else {}  # not one this module wrote: make them again
            files = [item.get("file", "") for item in index.get("items", [])] + [index.get("grid", "")]
            done = index.get("settings") == self.teacher_settings(method) and all(
                name and (folder / name).is_file() for name in files)
            if index and not done:
                log0("samples/teacher/ was made with other settings or is incomplete: generating it again",
                     level=logging.WARNING)
        return broadcast_object(done)

    @torch.no_grad()
    def teacher(self, method, step: int, tracker) -> None:
        """The teacher's videos (every rank), unless a run of this directory already wrote them."""
        if self.teacher_done(method):
            log0("teacher's validation videos: already in %s", self.root / "teacher")
            return
        ev = self.cfg.eval
        sigmas = sigma_grid(ev.teacher_steps, method.cfg.timestep_shift)
        guidance = self.teacher_guidance(method)
        uncond = None
        if guidance != 1.0:
            negative = ev.negative_prompt
            uncond = method.negative(1) if negative is None else method.encode([negative])

        def make(item: Item) -> torch.Tensor:
            return teacher_clips(method.real_score, method, method.vae, [item], self.num_frames, sigmas, uncond, guidance)[0]

        title = f"teacher: {ev.teacher_steps} Euler steps, CFG {guidance:g}"
        record = {"step": step, "settings": self.teacher_settings(method)}
        self._generate(self.root / "teacher", make, title, record, tracker, step, "teacher_samples",
                       is_image_student(method.generator))

    # ------------------------------------------------------------------ writing
    def _generate(self, folder: Path, make, title: str, record: dict, tracker, step: int, key: str,
                  image: bool = False) -> None:
        """make(item) on every rank; rank 0 writes each mp4 (image: png) as it comes, then the grid and index.json."""
        if self.write:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():  # a re-run of this step, or other prompts: no stale videos stay beside the new
                if OWN_FILE.fullmatch(old.name):
                    old.unlink()
        cells, labels, items = [], [], []
        for item, name in zip(self.items, self.names):
            clip = make(item)  # [F, C, H, W] in [-1, 1]
            if not self.write:
                continue
            if image:  # the paths are in index.json (the tracker logs videos)
                path = write_png(folder / f"{name}.png", to_uint8(clip)[0])
            else:
                path = write_video(folder / f"{name}.mp4", to_uint8(clip), fps=self.cfg.eval.fps)
                tracker.log_video(path, f"{key}/{name}", step)
            cells.append(grid_cell(clip))
            prompt = item.prompt if len(item.prompt) <= LABEL_CHARS else item.prompt[: LABEL_CHARS - 3] + "..."
            labels.append(f"{name}: {prompt}")
            items.append({"file": path.name, "prompt": item.prompt, "seed": item.seed, "index": item.index})
            beside = self.root / "teacher" / f"{name}.png"
            if image and key == "samples" and self.cfg.eval.teacher and beside.is_file():  # the teacher's, side by side
                cells.append(grid_cell(read_png(beside)[None]))
                labels.append(f"{name}: teacher")
        if not self.write:
            return
        upscale = max(1, GRID_CELL // max(cells[0].shape[-2:]))
        columns = len(self.seeds) * (len(cells) // len(items))
        grid = grid_video(torch.stack(cells), labels, upscale=upscale, columns=columns, title=title)
        if image:
            path = write_png(folder / "grid.png", grid[0])
        else:
            path = write_video(folder / "grid.mp4", grid, fps=self.cfg.eval.fps)
            tracker.log_video(path, f"{key}/grid", step)
        index = {**record, "num_frames": self.num_frames, "fps": self.cfg.eval.fps, "grid": path.name, "items": items}
        tmp = folder / ".index.partial.json"
        tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False))
        os.replace(tmp, folder / "index.json")  # last: a folder with index.json is complete (teacher_done)
        log0("%s: %d validation videos -> %s", title, len(items), folder)


def teacher_guidance(scale: float | None, method_cfg) -> float:
    """The teacher's CFG scale: `scale`, or null for the score the methods distil. Their real-score CFG is
    cond + s (cond - uncond) = uncond + (1 + s) (cond - uncond), so g = 1 + method.guidance_scale."""
    return float(1 + method_cfg.guidance_scale if scale is None else scale)


@torch.no_grad()
def teacher_clips(teacher, parts, vae, items: list[Item], num_frames: int, sigmas: list[float],
                  uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The teacher's videos of `items` in one batch: pixels [B, F', C, H, W] float32 on the CPU, in [-1, 1].

    Each starts from its student's initial noise: the first draw of the item's stream, as
    engine/inference.py `generate` draws it (row b of a batch equals the item's draw alone). The Euler
    ODE with CFG against `uncond` [1, L, D] (None: no CFG); `parts` encodes the prompts (a method or an
    inference Student: model/base.py RolloutParts), `vae` decodes."""
    rng = SampleRNG([it.noise_key for it in items], parts.device)
    noise = rng.randn((len(items), num_frames, *parts.latent_shape))
    if uncond is not None:
        uncond = uncond.expand(len(items), *uncond.shape[1:])
    x, _ = euler_sample(teacher, noise, sigmas, parts.encode([it.prompt for it in items]), uncond, guidance)
    return vae.decode(x).float().cpu()


def grid_cell(clip: torch.Tensor) -> torch.Tensor:
    """A clip [F, C, H, W] shrunk by a whole factor (area mean) until its longest side is at most GRID_CELL."""
    factor = math.ceil(max(clip.shape[-2:]) / GRID_CELL)
    if factor == 1:
        return clip
    h, w = clip.shape[-2:]
    return F.interpolate(clip, size=(h // factor, w // factor), mode="area")
