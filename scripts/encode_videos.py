"""Encode videos with Wan's VAE into latent shards for CausVid (data=latents), sharded across ranks.

Each video is read with imageio (ffmpeg), resampled to `--fps` when its frame rate is known, cut
to the clip length of the training config (1 + 4 (num_training_frames - 1) frames: 81 for 21
latent frames), scaled to cover the config's frame size (model.latent_shape x the VAE's 8x: 480 x
832) and centre-cropped, then encoded to normalised latents [F, C, H, W]. Prompts come from a CSV
(columns file/video/path and prompt/caption/text) or JSON ({file: prompt} or a list of
{"file", "prompt"}) mapping; names are relative to the video folder. Videos too short for the
clip are skipped with a warning. Shards: utils/data.py; every rank writes its own.

    python scripts/encode_videos.py --videos data/mixkit --prompts data/mixkit/captions.csv --out data/latents \\
        experiment=causvid model.path=/ckpt/Wan2.1-T2V-1.3B-Diffusers
    torchrun --nproc_per_node=8 scripts/encode_videos.py --videos ... --prompts ... --out ... experiment=causvid
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402

from engine.config import compose_checked  # noqa: E402
from utils.data import fill_shards, placement, shard_script_parser  # noqa: E402
from utils.distributed import barrier, log0  # noqa: E402

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
FILE_COLUMNS, PROMPT_COLUMNS = ("file", "video", "path", "filename"), ("prompt", "caption", "text")


def read_prompt_map(path: str | Path) -> dict[str, str]:
    """{video name relative to the folder: prompt} from a CSV or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt mapping {path} does not exist; expected a CSV or JSON file -> prompt mapping")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.items() if isinstance(data, dict) else ((d["file"], d["prompt"]) for d in data)
        return {str(k): str(v) for k, v in rows}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = {c.lower(): c for c in reader.fieldnames or ()}
        file_col = next((columns[c] for c in FILE_COLUMNS if c in columns), None)
        prompt_col = next((columns[c] for c in PROMPT_COLUMNS if c in columns), None)
        if file_col is None or prompt_col is None:
            raise ValueError(f"{path}: need a header with one of {FILE_COLUMNS} and one of {PROMPT_COLUMNS}, "
                             f"got {reader.fieldnames}")
        return {row[file_col]: row[prompt_col] for row in reader}


def list_videos(videos: str | Path, prompt_map: dict[str, str]) -> list[tuple[Path, str]]:
    """(video file, prompt) for a file or every video under a folder, each with its prompt."""
    root = Path(videos)
    if root.is_file():
        files, root = [root], root.parent
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    else:
        raise FileNotFoundError(f"{root} is neither a video file nor a folder of videos")
    if not files:
        raise FileNotFoundError(f"{root} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    items, missing = [], []
    for file in files:
        rel = file.relative_to(root).as_posix()
        prompt = prompt_map.get(rel, prompt_map.get(file.name))
        (missing.append(rel) if prompt is None else items.append((file, prompt)))
    if missing:
        raise KeyError(f"{len(missing)} videos have no prompt in the mapping, e.g. {missing[:3]}")
    return items


def clip_size(cfg: DictConfig, vae) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of a training clip, from the latent size the config trains on."""
    _, h, w = cfg.model.latent_shape
    s = vae.spatial_compression
    return 1 + vae.temporal_compression * (cfg.method.num_training_frames - 1), h * s, w * s


def load_clip(path: str | Path, frames: int, height: int, width: int, fps: float | None = None) -> torch.Tensor:
    """[frames, 3, height, width] in [-1, 1]: resampled to `fps`, scaled to cover, centre-cropped."""
    import imageio.v3 as iio

    source_fps = iio.immeta(path, plugin="FFMPEG").get("fps")
    stride = source_fps / fps if fps and source_fps else 1.0
    wanted = [round(i * stride) for i in range(frames)]  # source frame of each output frame
    keep, picked = set(wanted), {}
    for index, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):  # decodes only up to the last frame needed
        if index in keep:
            picked[index] = torch.from_numpy(frame[..., :3].copy())
        if index >= wanted[-1]:
            break
    if len(picked) < len(keep):
        raise ValueError(f"{path} is too short: {frames} frames at {fps or source_fps} fps need source frame "
                         f"{wanted[-1]}, it has {max(picked, default=-1) + 1}")
    x = torch.stack([picked[i] for i in wanted]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, math.ceil(x.shape[2] * scale)), max(width, math.ceil(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top : top + height, left : left + width].clamp(-1.0, 1.0)


def encode_videos(cfg: DictConfig, items: list[tuple[Path, str]], out: str | Path, *, shard_size: int = 64,
                  batch_size: int = 1, fps: float | None = 16.0, rank: int | None = None,
                  world_size: int | None = None, device: torch.device | None = None,
                  overwrite: bool = False) -> list[Path]:
    """Write this rank's shards of (prompt, latents) under `out`; returns the files written."""
    rank, world_size, device = placement(cfg, rank, world_size, device)
    vae = instantiate(cfg.model.vae).to(device)
    frames, height, width = clip_size(cfg, vae)

    def make(start: int, end: int):
        clips, prompts, latents = [], [], []
        for file, prompt in items[start:end]:
            try:
                clips.append(load_clip(file, frames, height, width, fps))
                prompts.append(prompt)
            except ValueError as e:
                log0("skipped: %s", e, level=logging.WARNING)
        for i in range(0, len(clips), batch_size):
            latents.append(vae.encode(torch.stack(clips[i : i + batch_size]).to(device)).cpu())
        return (torch.cat(latents) if latents else torch.empty(0)), prompts

    settings = {"num_frames": cfg.method.num_training_frames, "height": height, "width": width, "fps": fps,
                "vae": str(cfg.model.vae.path)}
    return fill_shards(out, len(items), shard_size, rank, world_size, "latents", make, settings, overwrite, log0)


def main(argv=None) -> None:
    p = shard_script_parser(__doc__, "clips", "clips encoded at once")
    p.add_argument("--videos", required=True, help="a video file or a folder of videos")
    p.add_argument("--prompts", required=True, help="CSV / JSON mapping video file -> prompt")
    p.add_argument("--fps", type=float, default=16.0, help="resample to this frame rate (Wan: 16); 0 = keep every frame")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = compose_checked(args.overrides)
    items = list_videos(args.videos, read_prompt_map(args.prompts))
    with torch.no_grad():
        written = encode_videos(cfg, items, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                                fps=args.fps or None, overwrite=args.overwrite)
    barrier()
    log0("rank 0 wrote %d shards of %d videos in all: %s", len(written), len(items), args.out)


if __name__ == "__main__":
    main()
