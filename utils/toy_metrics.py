"""Scores for toy-world samples against the known truth (used by training's evaluation and inference).

Every sample clip [F, C, H, W] is compared with the world's templates of the same length:
  * match_rate: its nearest template (over all prompts) is one of its own prompt's and lies
    within the match radius: by default no farther from it than that template moved by one pixel
    (`tolerance_px`), or within an absolute `threshold`; it looks like the prompted clip;
  * coverage: how many of a prompt's templates its matched samples reach (mode collapse shows
    as coverage 1 / K);
  * frame_error: per frame index, the error against the sample's nearest own-prompt template;
    on clips longer than the training length it shows how errors grow as a rollout goes on.
A reference row comes from the exact teacher itself: `sample_teacher` is 50-step Euler on its
flow, so a student's numbers can be read next to what the teacher gets.
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.toy.world import ToyWorld
from pipeline.ode import euler_sample, sigma_grid

# The match radius of a template is its distance to itself moved by `tolerance_px` pixels (the
# mean over left, right, up and down), so the rule reads "the right picture to within a pixel"
# at any frame size. At 16 x 16 a one-pixel move costs 0.25 to 0.35 (by shape and path); a
# template of another prompt is at least 0.316 away and the nearest-template rule keeps
# those apart. An absolute `threshold` (e.g. 0.1, about a quarter pixel) overrides the radius.
DEFAULT_TOLERANCE_PX = 1.0
REQUIRED_FIELDS = ("step", "match_rate", "coverage", "frame_error")


def frame_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame RMSE of clips [..., F, C, H, W] (broadcast): sqrt(mean over C, H, W) -> [..., F]."""
    return ((a.double() - b.double()) ** 2).mean(dim=(-1, -2, -3)).sqrt()


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between clips: the per-frame RMSE averaged over frames, [...].

    A mean of per-frame metrics, so it is itself a metric (the triangle inequality holds) and
    is in pixel units: 0.1 means frames are off by 0.1 of the [-1, 1] range in RMS.
    """
    return frame_rmse(a, b).mean(dim=-1)


def pairwise_distance(samples: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """`distance` of every sample [N, F, C, H, W] to every template [M, F, C, H, W] -> [N, M]."""
    n, f = samples.shape[:2]
    d = torch.zeros(n, templates.shape[0], dtype=torch.float64)
    size = samples[0, 0].numel()
    for i in range(f):   # one frame at a time: memory stays [N, M] for any clip length
        a = samples[:, i].flatten(1).double().cpu()
        b = templates[:, i].flatten(1).double().cpu()
        d += torch.cdist(a, b) / size ** 0.5
    return d / f


@functools.lru_cache(maxsize=16)
def match_radii(world: ToyWorld, num_frames: int, tolerance_px: float) -> torch.Tensor:
    """[M] per template of `world.all_templates(num_frames)`: its distance to itself moved by tolerance_px."""
    moves = torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=torch.float64) * tolerance_px
    radii = []
    for prompt in world.prompts:
        _, colour, shape, _, _ = prompt.split()
        centres = world.centres(prompt, num_frames)
        moved = torch.stack([world.render(colour, shape, centres + m) for m in moves])
        radii.append(distance(moved, world.templates(prompt, num_frames)[None]).mean(dim=0))
    return torch.cat(radii)


def match_rule(metrics_cfg) -> dict:
    """`threshold` / `tolerance_px` keywords of `evaluate` from a data.metrics config.

    Configs written before match_tolerance_px existed carry an absolute match_threshold, kept as it was.
    """
    threshold = metrics_cfg.get("match_threshold")
    return {"threshold": threshold, "tolerance_px": metrics_cfg.get("match_tolerance_px", DEFAULT_TOLERANCE_PX)}


@dataclass
class Assignment:
    """Each sample's nearest templates, shared by all metrics so distances are computed once."""
    own: torch.Tensor               # [N] prompt index of each sample
    nearest: torch.Tensor           # [N] nearest template over the whole world
    nearest_distance: torch.Tensor  # [N]
    own_nearest: torch.Tensor       # [N] nearest template among the sample's own prompt's
    template_prompt: torch.Tensor   # [M] prompt index of each template
    templates: torch.Tensor         # [M, F, C, H, W]


def assign(samples: torch.Tensor, prompts: list[str], world: ToyWorld) -> Assignment:
    if samples.ndim != 5 or samples.shape[0] != len(prompts):
        raise ValueError(f"expected samples [N, F, C, H, W] and N prompts, got "
                         f"{tuple(samples.shape)} and {len(prompts)} prompts")
    templates, template_prompt = world.all_templates(samples.shape[1])
    own = torch.tensor([world.prompt_index(p) for p in prompts], dtype=torch.long)
    d = pairwise_distance(samples, templates)
    nearest_distance, nearest = d.min(dim=1)
    own_d = d.masked_fill(template_prompt[None] != own[:, None], float("inf"))
    return Assignment(own, nearest, nearest_distance, own_d.argmin(dim=1), template_prompt,
                      templates)


def radius_of(a: Assignment, world: ToyWorld, threshold: float | None = None,
              tolerance_px: float = DEFAULT_TOLERANCE_PX) -> torch.Tensor:
    """[M] the match radius of every template: `threshold` if given, else its `tolerance_px` move."""
    if threshold is not None:
        return torch.full(a.template_prompt.shape, float(threshold), dtype=torch.float64)
    return match_radii(world, a.templates.shape[1], float(tolerance_px))


def matched(a: Assignment, radius: torch.Tensor) -> torch.Tensor:
    """[N] bool: the nearest template is the sample's own prompt's and within its radius [M]."""
    return (a.template_prompt[a.nearest] == a.own) & (a.nearest_distance <= radius[a.nearest])


def match_rate(samples: torch.Tensor, prompts: list[str], world: ToyWorld, threshold: float | None = None,
               tolerance_px: float = DEFAULT_TOLERANCE_PX) -> float:
    a = assign(samples, prompts, world)
    return matched(a, radius_of(a, world, threshold, tolerance_px)).double().mean().item()


def coverage_of(a: Assignment, world: ToyWorld, radius: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Mean and per-prompt coverage, over the prompts that have samples.

    A template counts as covered when it is the nearest template of a *matched* sample of its
    prompt: a blurry or wrong sample is nearest to some template too, but reaches nothing.
    """
    ok = matched(a, radius)
    k = world.templates_per_prompt
    per_prompt = {}
    for p in a.own.unique().tolist():
        hit = a.nearest[ok & (a.own == p)].unique()
        per_prompt[world.prompts[p]] = len(hit) / k
    return sum(per_prompt.values()) / len(per_prompt), per_prompt


def ideal_coverage(a: Assignment, world: ToyWorld) -> float:
    """Expected coverage of a perfect sampler with the same number of samples per prompt.

    n uniform draws from K templates reach 1 - (1 - 1/K)^n of them on average: with fewer
    samples than templates, even the exact teacher cannot reach coverage 1.
    """
    k = world.templates_per_prompt
    counts = torch.bincount(a.own).double()
    counts = counts[counts > 0]
    return (1 - (1 - 1 / k) ** counts).mean().item()


def coverage(samples: torch.Tensor, prompts: list[str], world: ToyWorld, threshold: float | None = None,
             tolerance_px: float = DEFAULT_TOLERANCE_PX) -> tuple[float, dict[str, float]]:
    a = assign(samples, prompts, world)
    return coverage_of(a, world, radius_of(a, world, threshold, tolerance_px))


def frame_error_of(samples: torch.Tensor, a: Assignment) -> list[float]:
    """Mean over samples of frame_rmse to the nearest own-prompt template: one float per frame."""
    return frame_rmse(samples.cpu(), a.templates[a.own_nearest]).mean(dim=0).tolist()


def frame_error(samples: torch.Tensor, prompts: list[str], world: ToyWorld) -> list[float]:
    return frame_error_of(samples, assign(samples, prompts, world))


def evaluate(samples: torch.Tensor, prompts: list[str], world: ToyWorld, threshold: float | None = None,
             tolerance_px: float = DEFAULT_TOLERANCE_PX) -> dict:
    """All toy metrics of samples [N, F, C, H, W] generated for `prompts`, as a JSON-able dict.

    A match is within `threshold` of the nearest template if given, else within its `tolerance_px` move.
    """
    a = assign(samples, prompts, world)
    radius = radius_of(a, world, threshold, tolerance_px)
    cov, per_prompt = coverage_of(a, world, radius)
    return {
        "match_rate": matched(a, radius).double().mean().item(),
        "coverage": cov,
        "coverage_per_prompt": per_prompt,
        "coverage_ideal": ideal_coverage(a, world),
        "frame_error": frame_error_of(samples, a),
        "mean_distance": a.nearest_distance.mean().item(),
        "num_samples": samples.shape[0],
        "num_frames": samples.shape[1],
        "threshold": threshold,
        "match_tolerance_px": None if threshold is not None else tolerance_px,
    }


@torch.no_grad()
def sample_teacher(teacher, text_encoder, prompts: list[str], num_frames: int, steps: int = 50,
                   shift: float = 5.0, guidance_scale: float = 1.0,
                   generator: torch.Generator | None = None, batch_size: int = 128) -> torch.Tensor:
    """The teacher's own samples: `steps`-step Euler from noise, [N, F, C, H, W] float32.

    guidance_scale 1 samples the exact conditional distribution (the conditional posterior is
    already exact); larger values add classifier-free guidance against the empty prompt. All
    noise is drawn up front, so the result does not depend on batch_size; batches of ~100 clips
    keep the float64 state in cache and run several times faster than one big batch on a CPU.
    """
    world = teacher.world
    device = teacher.prompt_table.device
    shape = (len(prompts), num_frames, world.channels, world.height, world.width)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    sigmas = sigma_grid(steps, shift)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        context = text_encoder(chunk)["prompt_embeds"].to(device)
        uncond = text_encoder([""] * len(chunk))["prompt_embeds"].to(device) \
            if guidance_scale != 1.0 else None
        x, _ = euler_sample(teacher, noise[i:i + batch_size].to(device), sigmas, context, uncond,
                            guidance_scale)
        out.append(x.float().cpu())
    return torch.cat(out)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one evaluation as a JSON line (e.g. to <run dir>/metrics.jsonl)."""
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"metrics record lacks {missing}; every line needs {REQUIRED_FIELDS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=lambda o: o.tolist()) + "\n")
