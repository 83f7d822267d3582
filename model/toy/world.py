"""The toy world: a procedural text-to-video distribution with known ground truth.

A clip shows one soft-edged coloured shape on a white background, moving at constant speed in
the prompted direction and bouncing off the frame's edges, e.g. "a red circle moving left".
The grammar is 4 colours x 3 shapes x 4 directions = 48 prompts. Each prompt has a finite set
of templates: `lanes` positions across the motion axis x `phases` start offsets along it, so the
data set is finite and an exact denoiser exists (model/toy/teacher.py). Bouncing makes a clip of
any length well defined, so students can be scored past their training length.

Layout: a clip is [F, C, H, W] with C = 3 (RGB), pixel values in [-1, 1]; batches [B, F, C, H, W].
"""

import functools
import math

import torch

# RGB in [-1, 1]. On white, each of these differs from the background in at least two channels,
# which doubles the distance between templates of different prompts compared with a black
# background (where red, green and blue differ from it in one channel only).
COLOURS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
}
BACKGROUND = (1.0, 1.0, 1.0)
SHAPES = ("circle", "square", "triangle")
# Unit motion per direction as (dx, dy); image y grows downwards, so "up" is -y.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Every word a prompt may use, in a fixed order (the text encoder embeds them by position).
VOCABULARY = ("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)
CHANNELS = 3


def prompt_text(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


PROMPTS = [prompt_text(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def _bounce(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Triangle wave: u = 0 is `lo`, u = hi - lo is `hi`, u = 2 (hi - lo) is `lo` again."""
    span = hi - lo
    return lo + span - (torch.remainder(u, 2 * span) - span).abs()


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance in pixels (negative inside) from the shape centred at 0 with half-size r."""
    if shape == "circle":
        # Smaller than the square it would be inscribed in: a circle of radius r differs from
        # that square only in its corners, too close a pair for a 16 x 16 frame.
        return torch.sqrt(dx * dx + dy * dy) - 0.8 * r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - r
    if shape == "triangle":
        # Apex (0, -r), base corners (+-r, r): the max of half-plane distances of the base and
        # the slanted edges (normal (2, -1) / sqrt(5)), exact inside. Outside it underestimates
        # near the corners (the apex's soft edge would reach 1.1 px out), so the bounding box's
        # planes are added: like every shape, the drawn triangle stays within r + 0.5.
        box = torch.maximum(dx.abs(), dy.abs()) - r
        return torch.maximum(torch.maximum(dy - r, (2 * dx.abs() - dy - r) / math.sqrt(5.0)), box)
    raise ValueError(f"unknown shape {shape!r}; the toy shapes are {SHAPES}")


class ToyWorld:
    """The prompts and template clips of the toy world; any number of frames can be asked for.

    Templates of prompt p are numbered p * K + k in `all_templates`, K = lanes * phases.
    """

    def __init__(self, height: int = 16, width: int = 16, num_frames: int = 12,
                 radius: float = 3.5, speed: float = 0.75, lanes: int = 3, phases: int = 2):
        # The shape (half-size radius, plus half a pixel of anti-aliased edge) must fit with room
        # to move, or there would be no motion to learn.
        for name, size in (("height", height), ("width", width)):
            if size - 2 * (radius + 0.5) <= 0:
                raise ValueError(f"{name}={size} leaves no room for a shape of radius {radius}; "
                                 f"use {name} > {2 * radius + 1:g} or a smaller radius")
        if num_frames < 1 or speed <= 0 or lanes < 1 or phases < 1:
            raise ValueError(f"need num_frames >= 1, speed > 0, lanes >= 1, phases >= 1; got "
                             f"{num_frames=}, {speed=}, {lanes=}, {phases=}")
        self.height, self.width, self.num_frames = height, width, num_frames
        self.radius, self.speed, self.lanes, self.phases = radius, speed, lanes, phases
        self.channels = CHANNELS
        self.prompts = list(PROMPTS)
        self._index = {p: i for i, p in enumerate(self.prompts)}

    @property
    def templates_per_prompt(self) -> int:
        return self.lanes * self.phases

    def prompt_index(self, prompt: str) -> int:
        key = " ".join(prompt.lower().split())
        if key not in self._index:
            raise ValueError(f"{prompt!r} is not a toy-world prompt; prompts read "
                             f"'a <colour> <shape> moving <direction>' with colour in "
                             f"{tuple(COLOURS)}, shape in {SHAPES}, direction in {tuple(DIRECTIONS)}")
        return self._index[key]

    def _limits(self, size: int) -> tuple[float, float]:
        # Centre range that keeps the whole shape, edge included, inside the frame.
        margin = self.radius + 0.5
        return margin, size - margin

    def centres(self, prompt: str, num_frames: int | None = None) -> torch.Tensor:
        """Shape centres in pixels, [K, F, 2] as (x, y); pixel i covers [i, i + 1)."""
        num_frames = num_frames or self.num_frames
        dx, dy = DIRECTIONS[self.prompts[self.prompt_index(prompt)].split()[-1]]
        along, across = (self._limits(self.width), self._limits(self.height)) if dx else \
            (self._limits(self.height), self._limits(self.width))
        step = dx or dy
        span = along[1] - along[0]
        # A clip starts `offset` in from the edge it moves away from, so that at the training
        # length it mostly moves as prompted. On the triangle wave, moving up the axis from
        # lo + o is u = o; moving down it from hi - o is u = span + o.
        offsets = torch.arange(self.phases, dtype=torch.float64) * span / (self.phases + 1)
        u0 = offsets if step > 0 else span + offsets
        lanes = torch.linspace(across[0], across[1], self.lanes, dtype=torch.float64) \
            if self.lanes > 1 else torch.tensor([(across[0] + across[1]) / 2], dtype=torch.float64)
        t = torch.arange(num_frames, dtype=torch.float64) * self.speed
        pos_along = _bounce(u0[:, None] + t[None, :], *along)                  # [phases, F]
        pos_along = pos_along[None].expand(self.lanes, -1, -1)                  # [lanes, phases, F]
        pos_across = lanes[:, None, None].expand_as(pos_along)
        xy = (pos_along, pos_across) if dx else (pos_across, pos_along)
        return torch.stack(xy, dim=-1).reshape(self.templates_per_prompt, num_frames, 2)

    def render(self, colour: str, shape: str, centres: torch.Tensor) -> torch.Tensor:
        """Draw the shape at each centre [..., 2]: clips [..., C, H, W] in [-1, 1], float32."""
        ys = torch.arange(self.height, dtype=torch.float64) + 0.5
        xs = torch.arange(self.width, dtype=torch.float64) + 0.5
        dx = xs[None, :] - centres[..., 0, None, None]                          # [..., 1, W]
        dy = ys[:, None] - centres[..., 1, None, None]                          # [..., H, 1]
        dx, dy = torch.broadcast_tensors(dx, dy)
        # One pixel of linear anti-aliasing: sub-pixel motion stays smooth, not jumpy.
        alpha = (0.5 - _signed_distance(shape, dx, dy, self.radius)).clamp(0.0, 1.0)
        bg = torch.tensor(BACKGROUND, dtype=torch.float64)[:, None, None]
        fg = torch.tensor(COLOURS[colour], dtype=torch.float64)[:, None, None]
        return (bg + alpha[..., None, :, :] * (fg - bg)).float()

    def templates(self, prompt: str, num_frames: int | None = None) -> torch.Tensor:
        """The prompt's template clips, [K, F, C, H, W]."""
        p = self.prompt_index(prompt)
        videos, _ = self.all_templates(num_frames)
        k = self.templates_per_prompt
        return videos[p * k:(p + 1) * k]

    def all_templates(self, num_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every template of the world: clips [P * K, F, C, H, W] and their prompt index [P * K].

        Cached per length and shared: treat the returned tensors as read-only.
        """
        return self._all_templates(num_frames or self.num_frames)

    @functools.lru_cache(maxsize=8)
    def _all_templates(self, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        videos = []
        for prompt in self.prompts:
            _, colour, shape, _, _ = prompt.split()
            videos.append(self.render(colour, shape, self.centres(prompt, num_frames)))
        ids = torch.arange(len(self.prompts)).repeat_interleave(self.templates_per_prompt)
        return torch.cat(videos), ids
