"""Video pictures: clips to uint8 frames, labelled grids of samples, mp4 / gif files."""

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 4                 # pixels between grid cells and around the label text
GRID_BG = (40, 40, 40)  # dark grey, so white-background clips stand out as cells
TEXT = (235, 235, 235)


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """[F, C, H, W] in [-1, 1] -> [F, H, W, 3] uint8 (one channel is shown as grey)."""
    if clip.ndim != 4 or clip.shape[1] not in (1, 3):
        raise ValueError(f"expected a clip [F, C, H, W] with C in (1, 3), got {tuple(clip.shape)}")
    x = ((clip.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _text_block(lines_per_cell: list[list[str]], width: int, font, line_h: int) -> list[np.ndarray]:
    """Each cell's label drawn on its own strip [h, width, 3], all strips the same height."""
    height = max(len(lines) for lines in lines_per_cell) * line_h + PAD
    strips = []
    for lines in lines_per_cell:
        img = Image.new("RGB", (width, height), GRID_BG)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate(lines):
            draw.text((0, PAD // 2 + i * line_h), line, fill=TEXT, font=font)
        strips.append(np.asarray(img))
    return strips


def grid_video(clips: torch.Tensor, labels: list[str], upscale: int = 8,
               columns: int | None = None, title: str = "") -> np.ndarray:
    """Samples side by side, each labelled with its prompt: uint8 frames [F, H', W', 3].

    clips: [N, F, C, H, W] in [-1, 1]. Each cell is upscaled by nearest neighbour so that 16 x 16
    clips are visible; a header shows `title` and the frame number, so a viewer can tell frames
    past the training length apart.
    """
    if clips.ndim != 5 or len(labels) != clips.shape[0]:
        raise ValueError(f"expected clips [N, F, C, H, W] and N labels, got {tuple(clips.shape)} "
                         f"and {len(labels)} labels")
    n, f, _, h, w = clips.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    cell_w = w * upscale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 2
    strips = _text_block([_wrap(lbl, font, cell_w, probe) for lbl in labels], cell_w, font, line_h)
    cell_h = h * upscale + strips[0].shape[0]
    header = line_h + PAD
    out = np.empty((f, header + rows * (cell_h + PAD) + PAD, columns * (cell_w + PAD) + PAD, 3),
                   dtype=np.uint8)
    out[:] = GRID_BG
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = header + PAD + r * (cell_h + PAD), PAD + c * (cell_w + PAD)
        frames = to_uint8(clips[i]).repeat(upscale, axis=1).repeat(upscale, axis=2)
        out[:, y:y + h * upscale, x:x + cell_w] = frames
        out[:, y + h * upscale:y + cell_h, x:x + cell_w] = strips[i]
    for t in range(f):
        img = Image.fromarray(out[t, :header])
        ImageDraw.Draw(img).text((PAD, PAD // 2), f"{title}  frame {t + 1}/{f}".strip(),
                                 fill=TEXT, font=font)
        out[t, :header] = np.asarray(img)
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write uint8 frames [T, H, W, 3] as .mp4 (H.264 via imageio-ffmpeg) or .gif, by extension."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        # H.264 in yuv420p wants even sizes, and ffmpeg would rescale to 16-pixel blocks with a
        # warning; pad with the grid colour instead so pixels stay sharp.
        t, h, w, _ = frames.shape
        padded = np.empty((t, -(-h // 16) * 16, -(-w // 16) * 16, 3), dtype=np.uint8)
        padded[:] = GRID_BG
        padded[:, :h, :w] = frames
        iio.imwrite(path, padded, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=16)
    elif suffix == ".gif":
        iio.imwrite(path, frames, plugin="pillow", duration=1000 / fps, loop=0)
    else:
        raise ValueError(f"cannot write {path.name!r}: use a .mp4 or .gif file name")
    return path

