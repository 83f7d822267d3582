"""Inference: load a trained student (engine/student.py), stream videos for (prompt, seed) items, write
mp4 + index.json.

The generator runs through `pipeline.rollout.rollout`, the code training runs, and each finished
chunk goes straight to the VAE's stream decoder, so the first frames exist after the first chunk.
Item i (prompts in order, each with every seed in order) draws its noise from the stream
`SampleRNG.for_samples(seed, 0, "eval", [i])`, the key of training's evaluation (engine/evaluation.py
`sample`): the same checkpoint, prompts and seed give the evaluation's clips exactly, whatever the
batch size or number of ranks. Everything that can be wrong with the input is checked before the
first file is written, and every file is written under a temporary name and renamed. An output_dir
that holds an earlier inference is refused unless overwrite=true, which first removes that run's files
(`earlier_run`), so old and new videos never mix silently.

Timelines (`prompts=` a .yaml / .yml file of {start: <seconds>, prompt: <text>} entries) and continuation
(`init_video=` / `init_image=`) run each video as a `engine.stream.Stream` instead: one item at a time, its
prompt switched at the chunk where each entry starts, its frames written to the mp4 as they come. With
the item's noise key and length a stream draws generate's noise, so a one-entry timeline gives the
prompt's video.

An image student (model/image_kd.py, a WanImageDiT) makes one PNG per item instead (`generate_images`, the
sampler of its training's validation images, from the same noise key), with the same index.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm import tqdm

from model.image_kd import is_image_student, sample_images
from pipeline.rollout import rollout
from engine.build import backbone_config
from utils.distributed import pick_device
from engine.config import DataSchema, ModelSchema, method_config
from utils.distributed import all_gather_object, barrier, broadcast_object, init_distributed, is_main, log0
from utils.sample_rng import SampleRNG
from utils.speed import SpeedSchema
from engine.items import (Item, check_num_frames, frames_for_duration, is_timeline, make_items, place_timeline,
                          read_frames, read_noise, read_prompts, read_seeds, read_timelines)
from engine.stream import Stream, StreamCaches, StreamSchema, context_latents, stream_pattern
from engine.student import CHECKPOINT_FORMS, Source, Student, build_student, resolve_checkpoint, run_config

log = logging.getLogger(__name__)



@dataclass
class InferenceSchema:
    """Every inference knob and its default; configs/inference.yaml comments each one."""

    checkpoint: str = MISSING
    use_ema: Optional[bool] = None
    prompts: Any = None
    seed: Any = 0
    num_frames: Optional[int] = None
    duration: Optional[float] = None
    init_video: Optional[str] = None
    init_image: Optional[str] = None
    batch_size: int = 4
    output_dir: Optional[str] = None
    overwrite: bool = False
    noise: Optional[str] = None
    save_latents: bool = False
    fps: int = 16
    device: str = "auto"
    speed: SpeedSchema = field(default_factory=SpeedSchema)
    stream: StreamSchema = field(default_factory=StreamSchema)
    method: Any = MISSING  # training's method group (its rollout knobs describe a Self-Forcing .pt)
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)


ConfigStore.instance().store(name="inference_schema", node=InferenceSchema)


# ---------------------------------------------------------------------------- generation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Seconds since `start`, read at the end: CUDA events on the GPU (no host sync inside the loop),
    the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self._mark()

    def _mark(self, stream=None):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def mark(self, stream=None):
        return self._mark(stream)

    def seconds(self, mark) -> float:  # after a sync
        return self.start.elapsed_time(mark) / 1000 if self.cuda else mark - self.start


class _HostVideo:
    """The decoded clip on the host, filled chunk by chunk. On CUDA each chunk is copied into its slice of
    one pinned tensor by a copy stream, so the copy overlaps the next chunk's work instead of holding up
    the stream the model runs on, and no host-side concatenation of the clip follows (the clip never sits
    whole on the GPU). Read `video` only after a sync."""

    def __init__(self, num_frames: int):
        self.num_frames, self.filled, self.video, self.stream = num_frames, 0, None, None

    def add(self, pixels: torch.Tensor) -> None:
        # pixels: [B, F', C, H, W], the next F' frames of the clip
        if self.video is None:
            shape = (pixels.shape[0], self.num_frames, *pixels.shape[2:])
            self.video = torch.empty(shape, dtype=pixels.dtype, pin_memory=pixels.is_cuda)
        end = self.filled + pixels.shape[1]
        if end > self.num_frames or self.video.shape[2:] != pixels.shape[2:]:
            raise RuntimeError(f"decoded chunk {tuple(pixels.shape)} does not fit frames {self.filled}..{end} of "
                               f"the clip {tuple(self.video.shape)}: the VAE's temporal_compression disagrees with its decoder")
        target = self.video[:, self.filled : end]
        if pixels.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(pixels.device)
            self.stream.wait_stream(torch.cuda.current_stream(pixels.device))
            with torch.cuda.stream(self.stream):
                target.copy_(pixels, non_blocking=True)
            pixels.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            target.copy_(pixels)
        self.filled = end


@torch.no_grad()
def generate(student: Student, items: list[Item], num_frames: int, noise: torch.Tensor | None = None):
    """One batch: (latents [B, F, C, H, W], pixels [B, F', C', H', W'] float32 CPU, timing).

    The rollout's on_chunk hands each chunk to the stream decoder (on `student.decode_stream` when
    set, overlapping the next chunk's generator calls); `first_chunk_s` is the time from the start
    of the batch until the first chunk's frames are decoded."""
    device = student.device
    _sync(device)
    start = time.perf_counter()
    clock = _Clock(device)
    rng = SampleRNG([it.noise_key for it in items], device)
    x = rng.randn((len(items), num_frames, *student.latent_shape))  # drawn even when replaced: the streams stay aligned
    if noise is not None:
        x = noise.to(device=device, dtype=x.dtype)
    pattern = student.pattern_for(num_frames)
    kv_cache, cross = student.caches(len(items), num_frames, pattern, x.shape[-2:])
    decoder = student.vae.stream_decoder(len(items))
    stream = student.decode_stream
    pixels = _HostVideo(1 + student.vae.temporal_compression * (num_frames - 1))
    first = []

    def on_chunk(_start: int, x0: torch.Tensor) -> None:
        if stream is None:
            pixels.add(decoder.decode(x0))
        else:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                pixels.add(decoder.decode(x0))
            x0.record_stream(stream)
        if not first:
            first.append(clock.mark(stream))

    out = rollout(student.runner, x, student.encode([it.prompt for it in items]), student.steps, pattern,
                  schedule=student.schedule, context_noise=student.cfg.context_noise, rng=rng, on_chunk=on_chunk,
                  kv_cache=kv_cache, crossattn_cache=cross)
    _sync(device)  # the copies to the host are done
    if pixels.filled != pixels.num_frames:
        raise RuntimeError(f"decoded {pixels.filled} frames, expected {pixels.num_frames} for {num_frames} latent frames")
    video = pixels.video.float()
    timing = {"first_chunk_s": clock.seconds(first[0]), "seconds": time.perf_counter() - start}
    return out.video.float().cpu(), video, timing


@torch.no_grad()
def generate_images(student: Student, items: list[Item], num_frames: int, noise: torch.Tensor | None = None):
    """An image student's batch, as `generate` returns a video batch: (latents [B, 1, C, H, W], pixels
    [B, 1, C', H', W'] float32 CPU, timing); first_chunk_s is the whole batch's time (one image, one chunk)."""
    device = student.device
    _sync(device)
    start = time.perf_counter()
    rng = SampleRNG([it.noise_key for it in items], device)
    latents, pixels = sample_images(student, student.generator, [it.prompt for it in items], rng, noise)
    _sync(device)
    seconds = time.perf_counter() - start
    return latents.float().cpu(), pixels, {"first_chunk_s": seconds, "seconds": seconds}


def write_png(path: str | Path, frame: np.ndarray) -> Path:
    """uint8 pixels [H, W, 3] as a PNG file."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frame, extension=".png")
    return path


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG as [3, H, W] float32 in [-1, 1] (what write_png of to_uint8 wrote)."""
    return read_frames(str(path), "init_image")[0]


# The files inference writes: <index>_<prompt>_seed<s>.mp4 (.png) / .latents.safetensors, index.json, and their
# temporary names while being written (_replace_into: a leading dot and .partial before the suffix).
OUTPUT_NAME = re.compile(r"\.?\d{4,}_[a-z0-9-]*_seed-?\d+(\.latents)?(\.partial)?\.(mp4|png|safetensors)|\.?index(\.partial)?\.json")


def earlier_run(out_dir: Path) -> list[Path]:
    """The files an earlier inference left in `out_dir`: index.json, the videos and latents it lists, and any
    file named the way inference names its files (an interrupted run writes no index.json). Names listed
    in index.json count only as plain file names inside `out_dir`, so a crafted index cannot reach
    elsewhere; other files (Hydra's .hydra/ and log, a user's notes) are never included."""
    if not out_dir.is_dir():
        return []
    found = {p for p in out_dir.iterdir() if p.is_file() and OUTPUT_NAME.fullmatch(p.name)}
    try:
        items = json.loads((out_dir / "index.json").read_text()).get("items", [])
    except (OSError, ValueError, AttributeError):  # none, or not an index: the name patterns above still apply
        items = []
    for item in items if isinstance(items, list) else []:
        for key in ("file", "latents"):
            name = item.get(key) if isinstance(item, dict) else None
            if isinstance(name, str) and name.endswith((".mp4", ".png", ".safetensors")) and Path(name).name == name:
                if (out_dir / name).is_file():
                    found.add(out_dir / name)
    return sorted(found)


def _replace_into(final: Path, write) -> None:
    """write(tmp) then rename: a killed run leaves no partial file under a final name."""
    tmp = final.with_name(f".{final.stem}.partial{final.suffix}")
    write(tmp)
    os.replace(tmp, final)


def write_item(out_dir: Path, item: Item, pixels: torch.Tensor, latents: torch.Tensor | None, fps: int,
               image: bool = False) -> dict:
    """The item's mp4 (image: its png) and latents; its index.json record."""
    from safetensors.torch import save_file

    from utils.video import to_uint8, write_video

    video = out_dir / f"{item.stem}.{'png' if image else 'mp4'}"
    if image:
        _replace_into(video, lambda tmp: write_png(tmp, to_uint8(pixels)[0]))
    else:
        _replace_into(video, lambda tmp: write_video(tmp, to_uint8(pixels), fps=fps))
    record = {"index": item.index, "file": video.name, "prompt": item.prompt, "seed": item.seed, "frames": pixels.shape[0]}
    if latents is not None:
        path = out_dir / f"{item.stem}.latents.safetensors"
        _replace_into(path, lambda tmp: save_file({"latents": latents.contiguous()}, str(tmp)))
        record["latents"] = path.name
    return record


class Mp4Writer:
    """uint8 frames [F, H, W, 3] appended to an H.264 mp4 as they come: utils/video.py write_video's encoder
    settings and padding (to 16-pixel blocks, in the grid colour), without holding the video."""

    def __init__(self, path: Path, fps: float):
        import imageio.v2 as imageio

        self.writer = imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=16)
        self.frames = 0

    def add(self, frames: np.ndarray) -> None:
        from utils.video import GRID_BG

        t, h, w, _ = frames.shape
        if h % 16 or w % 16:
            padded = np.empty((t, -(-h // 16) * 16, -(-w // 16) * 16, 3), dtype=np.uint8)
            padded[:] = GRID_BG
            padded[:, :h, :w] = frames
            frames = padded
        for frame in frames:
            self.writer.append_data(frame)
        self.frames += t

    def close(self) -> None:
        self.writer.close()


@torch.no_grad()
def stream_item(plan: Plan, item: Item, out_dir: Path, cfg: DictConfig, caches: StreamCaches) -> tuple[dict, dict]:
    """One timeline or continuation item through a Stream: its mp4 written chunk by chunk (then renamed),
    its prompts switched where the timeline places them. Returns (index record, timing)."""
    student, timeline = plan.student, item.timeline or ((0.0, item.prompt),)
    context = 0 if plan.context is None else plan.context.shape[1]
    total = context + plan.num_frames
    placed = place_timeline(timeline, total, context, stream_pattern(student, plan.settings), student.vae.temporal_compression,
                            cfg.fps, f"item {item.index}")
    start = time.perf_counter()
    stream = Stream(student, placed[0][1], settings=plan.settings, fps=cfg.fps, num_frames=plan.num_frames,
                    init_latents=plan.context, key=item.noise_key, caches=caches)
    for frame, prompt in placed[1:]:
        stream.switch(prompt, at=frame)
    latents, first = [], None
    video = out_dir / f"{item.stem}.mp4"

    def write(tmp: Path) -> None:
        nonlocal first
        writer = Mp4Writer(tmp, cfg.fps)
        try:
            for chunk in stream:
                writer.add(chunk.frames.numpy())
                if first is None and not chunk.context:
                    first = time.perf_counter() - start
                if cfg.save_latents:
                    latents.append(chunk.latents.float().cpu())
        finally:
            writer.close()
            stream.stop()

    _replace_into(video, write)
    seconds = time.perf_counter() - start
    frames = 1 + student.vae.temporal_compression * (total - 1)
    record = {"index": item.index, "file": video.name, "prompt": item.prompt, "seed": item.seed, "frames": frames}
    if item.timeline:
        record["timeline"] = [{"start": s, "prompt": p, "latent_frame": f, "time": stream.time_of(f)}
                              for (s, p), (f, _) in zip(timeline, placed)]
    if plan.context is not None:
        record["context_latent_frames"] = context
        record["init"] = str(cfg.init_video or cfg.init_image)
    if cfg.save_latents:
        from safetensors.torch import save_file

        path = out_dir / f"{item.stem}.latents.safetensors"
        _replace_into(path, lambda tmp: save_file({"latents": torch.cat(latents).contiguous()}, str(tmp)))
        record["latents"] = path.name
    return record, {"first_chunk_s": first if first is not None else seconds, "seconds": seconds, "frames": frames}


# ---------------------------------------------------------------------------- the whole run
@dataclass
class Plan:
    """A checked run: everything that could be wrong with the input has been found by now."""

    source: Source
    student: Student
    items: list[Item]
    num_frames: int
    noise: torch.Tensor | None  # [N, F, C, H, W] for all items, or None: the keyed draws
    scored: bool  # toy world and only its prompts: compute the ground-truth metrics
    streamed: bool = False  # timelines or continuation: each item is a Stream (stream_item)
    context: torch.Tensor | None = None  # the init frames' latents [1, f, C, h, w], the same for every item
    settings: StreamSchema | None = None  # stream.*
    image: bool = False  # an image student: one PNG per item (generate_images)


def prepare(cfg: DictConfig, overrides: list[str], device: torch.device) -> Plan:
    """Resolve, read and check every input and build the student; writes nothing."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError(f"checkpoint is required: {CHECKPOINT_FORMS}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    source = resolve_checkpoint(cfg.checkpoint, cfg.use_ema)
    node = run_config(cfg, source, list(overrides))
    method = method_config(node, rollout_only=True)
    world = instantiate(node.data.world) if node.data.get("world") is not None else None
    per_prompt = node.data.metrics.samples_per_prompt if world is not None and node.data.get("metrics") else 1
    timelines = read_timelines(cfg.prompts) if is_timeline(cfg.prompts) else None
    init = {k: read_frames(cfg[k], k) for k in ("init_video", "init_image") if cfg[k]}
    if len(init) > 1:
        raise ValueError("init_video and init_image are both set: continue a video or start from an image, not both")
    streamed = timelines is not None or bool(init)
    if streamed and cfg.noise:
        raise ValueError("noise= is for batch inference; timelines and init_video / init_image draw their noise per item")
    if cfg.duration is not None and cfg.num_frames is not None:
        raise ValueError(f"num_frames={cfg.num_frames} and duration={cfg.duration} both set the length: set one")
    prompts = [t[0][1] for t in timelines] if timelines else read_prompts(cfg.prompts, world, per_prompt)
    seeds = read_seeds(cfg.seed)
    items = make_items(prompts, seeds)
    if timelines:  # timeline i, seed s: its first prompt names the file
        items = [replace(it, timeline=timelines[it.index // len(seeds)]) for it in items]
    num_frames = cfg.num_frames if cfg.num_frames is not None else method.num_training_frames
    if cfg.duration is None:  # else known once the VAE is built (its frames per latent frame)
        if not streamed:
            check_num_frames(num_frames, method, backbone_config(node))
        noise = read_noise(cfg.noise, (len(items), num_frames, *node.model.latent_shape)) if cfg.noise else None
    student = build_student(node, method, source, device, world, cfg.speed)
    image = is_image_student(student.generator)
    if image and (streamed or cfg.duration is not None):
        raise ValueError("this checkpoint is an image student (WanImageDiT), which makes single images: timelines "
                         "(prompts=*.yaml), init_video / init_image and duration are for video students")
    if image and num_frames != 1:
        raise ValueError(f"num_frames={num_frames}: this checkpoint is an image student (WanImageDiT), which makes "
                         "one frame; leave num_frames unset (or 1)")
    if cfg.duration is not None:
        num_frames = frames_for_duration(cfg.duration, cfg.fps, method.pattern, student.vae.temporal_compression)
        if not streamed:
            check_num_frames(num_frames, method, backbone_config(node))
        noise = read_noise(cfg.noise, (len(items), num_frames, *node.model.latent_shape)) if cfg.noise else None
    if hasattr(student.text_encoder, "check_prompts"):  # bad or over-long prompts named now, not after some videos
        student.text_encoder.check_prompts([p for t in timelines for _, p in t] if timelines else prompts)
    scored = student.match_rule is not None and not streamed
    if scored and not {it.prompt for it in items} <= set(world.prompts):
        log0("toy metrics skipped: some prompts are not toy-world prompts", level=logging.WARNING)
        scored = False
    if not streamed:
        return Plan(source, student, items, num_frames, noise, scored, image=image)
    settings = OmegaConf.to_object(cfg.stream) if OmegaConf.is_config(cfg.stream) else cfg.stream
    pattern = stream_pattern(student, settings)
    context = context_latents(student, pattern, video=init.get("init_video"), image=init.get("init_image"))
    context_frames = 0 if context is None else context.shape[1]
    try:
        pattern.check_clip(context_frames + num_frames)
    except ValueError as e:
        raise ValueError(f"num_frames={num_frames} is impossible for this checkpoint: {e}") from None
    for it in items:  # every entry placed now: a bad timeline stops before any video
        place_timeline(it.timeline or ((0.0, it.prompt),), context_frames + num_frames, context_frames, pattern,
                       student.vae.temporal_compression, cfg.fps, f"prompts={cfg.prompts} (item {it.index})")
    return Plan(source, student, items, num_frames, None, False, True, context, settings)



def run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] = ()) -> dict:
    """Generate every (prompt, seed) item of `cfg`; returns index.json's content on rank 0, {} elsewhere.

    `overrides`: the command line's model / method / data overrides (`group_overrides`)."""
    dist = init_distributed("cpu" if cfg.device == "cpu" else None)  # gloo for CPU runs on a GPU machine
    device = pick_device(cfg, dist.local_rank)
    out_dir = Path(broadcast_object(str(output_dir)))  # one directory even if ranks composed different ${now:}
    earlier = broadcast_object(earlier_run(out_dir) if is_main() else None)  # every rank refuses alike
    if earlier and not cfg.overwrite:
        shown = ", ".join(p.name for p in earlier[:2]) + (", ..." if len(earlier) > 2 else "")
        raise ValueError(f"output_dir={out_dir} already holds an earlier inference ({len(earlier)} files: {shown}); "
                         "pass overwrite=true to remove them first, or choose another output_dir")
    plan = prepare(cfg, overrides, device)  # bad input stops here, before the earlier run's files are removed
    log0("checkpoint %s (%s weights), %d videos of %d latent frames -> %s", plan.source.path, plan.source.weights,
         len(plan.items), plan.num_frames, out_dir)
    if is_main():
        for path in earlier:
            path.unlink(missing_ok=True)
        if earlier:
            log0("overwrite=true: removed %d files of an earlier inference from %s", len(earlier), out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    mine = plan.items[dist.rank :: dist.world_size]  # rank r: items r, r + W, r + 2W, ...
    records, clips, timings = [], [], []
    bar = tqdm(total=len(plan.items), unit="video", disable=not is_main(), dynamic_ncols=True)
    caches = StreamCaches()  # the streamed items run one after another in one set of caches (and CUDA graphs)
    for item in mine if plan.streamed else ():
        rec, timing = stream_item(plan, item, out_dir, cfg, caches)
        records.append(rec | {"checkpoint": str(plan.source.path), "latent_frames": plan.num_frames})
        timings.append(timing)
        bar.update(min(dist.world_size, bar.total - bar.n))
        bar.set_postfix(first_chunk=f"{timing['first_chunk_s']:.3f}s", refresh=False)
    caches.release(plan.student)
    for b in range(0, len(mine) if not plan.streamed else 0, cfg.batch_size):
        batch = mine[b : b + cfg.batch_size]
        noise = plan.noise[[it.index for it in batch]] if plan.noise is not None else None
        latents, pixels, timing = (generate_images if plan.image else generate)(plan.student, batch, plan.num_frames, noise)
        timings.append(timing | {"frames": pixels.shape[0] * pixels.shape[1]})
        for k, item in enumerate(batch):
            rec = write_item(out_dir, item, pixels[k], latents[k] if cfg.save_latents else None, cfg.fps, plan.image)
            records.append(rec | {"checkpoint": str(plan.source.path), "latent_frames": plan.num_frames})
            if plan.scored:
                clips.append((item.index, pixels[k]))
        bar.update(min(len(batch) * dist.world_size, bar.total - bar.n))  # rank 0's bar stands for all ranks
        bar.set_postfix(first_chunk=f"{timing['first_chunk_s']:.3f}s", refresh=False)
    bar.close()
    index = merge_index(plan, all_gather_object((records, timings, clips)), cfg.fps, dist.world_size, device)
    if index:
        _replace_into(out_dir / "index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
        index["output_dir"] = str(out_dir)
    return index


def merge_index(plan: Plan, gathered: list, fps: int, world_size: int, device: torch.device) -> dict:
    """Rank 0: every rank's (records, timings, clips) -> index.json's content, items in index order."""
    if not is_main():
        return {}
    records = sorted((r for rs, _, _ in gathered for r in rs), key=lambda r: r["index"])
    index = {"checkpoint": str(plan.source.path), "weights": plan.source.weights, "num_frames": plan.num_frames,
             "fps": fps, "world_size": world_size, "items": records}
    if plan.image:
        index["format"] = "png"  # an image student's: one PNG per item
    if plan.scored:
        from utils.toy_metrics import evaluate

        clips = torch.stack([c for _, c in sorted((c for _, _, cs in gathered for c in cs), key=lambda c: c[0])])
        s = plan.student
        index["toy_metrics"] = evaluate(clips, [r["prompt"] for r in records], s.world, **s.match_rule)
    return index | summarise([t for _, ts, _ in gathered for t in ts], [ts for _, ts, _ in gathered], device)


def summarise(batches: list[dict], per_rank: list[list[dict]], device: torch.device) -> dict:
    """Throughput over all ranks (decoded frames / the slowest rank's generation time) and first-chunk latency."""
    frames = sum(t["frames"] for t in batches)
    slowest = max((sum(t["seconds"] for t in ts) for ts in per_rank), default=0.0)
    latencies = [t["first_chunk_s"] for t in batches]
    return {
        "throughput_fps": frames / slowest if slowest > 0 else math.nan,
        "first_chunk_latency_s": sum(latencies) / len(latencies) if latencies else math.nan,
        "timing": {"batches": len(batches), "frames": frames, "generation_s": slowest,
                   "first_chunk_latency_s_per_batch": latencies, "device": str(device),
                   "synchronised": device.type == "cuda"},
    }
