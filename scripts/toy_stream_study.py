"""Toy-world check of streams (issue 29, item 6): drift past the training length, and prompt switches.

For each trained toy student (DMD, SiD, CausVid with teacher forcing: compare_methods.py's run folders, the
final EMA export of each):

1. Drift. Clips of 3x and 10x the training length, generated with the rolling KV cache (engine/stream.py's
   window: the training length, no sink). Per frame: the error against the sample's nearest own-prompt
   template (utils/toy_metrics.py frame_error, the training evaluation's definition), and the fraction of
   samples whose `--window`-frame window starting there shows the prompt (below). The 3x numbers are the
   run's own evaluation at data.metrics.long_num_frames (metrics.jsonl), which the streams reproduce: the
   script regenerates --check samples through Stream and compares.
2. Switches. A stream of prompt A switched at latent frame --switch-at to prompt B (colour, shape or
   motion axis changed), with LongLive's re-cache and with a plain switch, until 3x the training length;
   per frame after the switch the fraction of streams that show B (and A), and the frames until each
   shows B. The ceiling: B streamed from the start with the same noise.

What "shows a prompt" means (window_matches): the toy templates bounce, so a later stretch of a clip is
not the start of a template; a window of w frames is compared with every w-frame stretch of every template
at any phase of its bouncing path (a "segment"). The window shows prompt B when its nearest segment (mean
per-frame RMSE, over all prompts' segments) belongs to B's class and each of the window's frames lies within
the one-pixel radius of the segment's frame (its distance to itself moved by one pixel, the evaluation's
match rule, per frame: so a window that still holds a frame of A does not show B). The class is (colour,
shape, motion axis): a bouncing path moving left is, a little later, a path moving right, so at any phase the
sign of the direction cannot be told and left/right (up/down) are one class. The window is one chunk (3
frames) by default: the unit the student generates, and short enough that a shape parked at the edge (the
students do not learn to bounce, docs/toy-world.md) still matches the segments where a template turns.
Frames to switch: d = t - s for the first window start t >= s (s the switch frame) whose window shows B;
none when no window before the end does.

Outputs (into --out): stream_study.md (tables), stream_study.json (the tables' rows), drift.png, switch.png,
and <out>/methods/<name>.json (every curve and per-stream result of a method), so methods can be run one at a
time (--methods) and the report is rebuilt from all that are there (--report-only).

  python scripts/toy_stream_study.py --runs outputs/stream_study/runs --out docs/stream_study
  python scripts/compare_methods.py --methods dmd,sid,causvid_tf --out outputs/stream_study/runs --docs /tmp/cmp  # the runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.toy.world import COLOURS, DIRECTIONS, SHAPES, ToyWorld, prompt_text  # noqa: E402
from scripts.compare_methods import git_revision, markdown  # noqa: E402
from utils.toy_metrics import evaluate, frame_rmse  # noqa: E402

log = logging.getLogger("toy_stream_study")
METHODS = {"dmd": "self forcing, DMD", "sid": "self forcing, SiD", "causvid_tf": "CausVid, teacher forcing"}
KINDS = ("colour", "shape", "axis")
MOVES = torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=torch.float64)  # the one-pixel rule's moves


# ---------------------------------------------------------------------------- what a window shows
def prompt_class(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, axis) of a toy prompt: what a window at any phase of a bouncing path can show."""
    _, colour, shape, _, direction = prompt.split()
    return colour, shape, "horizontal" if DIRECTIONS[direction][0] else "vertical"


def path_period(world: ToyWorld, limit: int = 256) -> int:
    """Frames after which every template's position repeats (both axes), so that segments starting at
    0 .. period - 1 hold every phase; at most `limit` (then the phases are a dense sample)."""
    spans = {2 * (size - 2 * (world.radius + 0.5)) for size in (world.height, world.width)}
    for t in range(1, limit + 1):
        if all(abs(math.remainder(t * world.speed, s)) < 1e-9 for s in spans):
            return t
    return limit


@dataclass
class Segments:
    """Every template of the world rendered over period + window - 1 frames: segment (m, o) is frames
    o .. o + window - 1 of template m."""

    frames: torch.Tensor  # [M, L, D] float32, flattened pixels
    radius: torch.Tensor  # [M, L] the per-frame RMSE of each template frame to itself moved by one pixel (mean of 4 moves)
    cls: torch.Tensor  # [M] class index of each template
    classes: list[tuple[str, str, str]]
    window: int
    offsets: int


def segments(world: ToyWorld, window: int) -> Segments:
    if window < 1:
        raise ValueError(f"--window {window}: expected a positive number of frames")
    offsets = path_period(world)
    length = offsets + window - 1
    classes = sorted({prompt_class(p) for p in world.prompts})
    frames, radius, cls = [], [], []
    for prompt in world.prompts:
        _, colour, shape, _, _ = prompt.split()
        centres = world.centres(prompt, length)
        clips = world.render(colour, shape, centres)  # [K, L, C, H, W]
        moved = torch.stack([world.render(colour, shape, centres + m) for m in MOVES])
        frames.append(clips.flatten(2))
        radius.append(frame_rmse(moved, clips[None]).mean(dim=0))
        cls += [classes.index(prompt_class(prompt))] * clips.shape[0]
    return Segments(torch.cat(frames), torch.cat(radius), torch.tensor(cls), classes, window, offsets)


@dataclass
class WindowScores:
    """Per window start t of a clip (windows t .. t + w - 1, t = 0 .. F - w)."""

    nearest_class: torch.Tensor  # [T] class of the nearest segment (mean per-frame RMSE)
    distance: torch.Tensor  # [T] its distance
    within: torch.Tensor  # [T] bool: every frame of the window within the one-pixel radius of the segment's frame
    class_distance: torch.Tensor  # [T, classes] the nearest segment's distance within each class

    def shows(self, cls: int) -> torch.Tensor:
        """[T] bool: the window shows class `cls`: its nearest segment is of that class and each of its frames
        lies within a one-pixel move of that segment's frame (so a window that still holds a frame of another
        prompt does not count)."""
        return (self.nearest_class == cls) & self.within


def window_scores(clip: torch.Tensor, segs: Segments) -> WindowScores:
    """clip [F, C, H, W] -> the nearest segment of every window, over all templates and phases."""
    w, n = segs.window, segs.offsets
    if clip.shape[0] < w:
        raise ValueError(f"a clip of {clip.shape[0]} frames has no window of {w}")
    x = clip.flatten(1).float().cpu()
    m, length, size = segs.frames.shape
    # per-frame RMSE of every clip frame to every template frame (float32 distances: compared with radii of 0.2+)
    d = (torch.cdist(x, segs.frames.reshape(m * length, size)) / size ** 0.5).reshape(len(x), m, length).double()
    t = len(x) - w + 1
    dist = torch.zeros(t, m, n, dtype=torch.float64)
    for j in range(w):  # segment (m, o) against window t: mean over j of frame t + j vs template frame o + j
        dist += d[j : j + t, :, j : j + n]
    dist = dist / w
    flat = dist.reshape(t, -1)
    best = flat.argmin(dim=1)
    template, offset = best // n, best % n
    steps = torch.arange(w)
    frame_dist = d[torch.arange(t)[:, None] + steps, template[:, None], offset[:, None] + steps]  # [T, w]
    frame_radius = segs.radius[template[:, None], offset[:, None] + steps]
    per_class = torch.stack([dist[:, segs.cls == c].reshape(t, -1).min(dim=1).values for c in range(len(segs.classes))],
                            dim=1)
    return WindowScores(segs.cls[template], flat.gather(1, best[:, None])[:, 0], (frame_dist <= frame_radius).all(dim=1),
                        per_class)


def frames_to_switch(shows_new: torch.Tensor, switch_at: int) -> int | None:
    """The frames from the switch to the first window start t >= switch_at whose window shows the new prompt
    (shows_new: [T] bool per window start); None when none does."""
    hits = torch.nonzero(shows_new[switch_at:]).flatten()
    return int(hits[0]) if len(hits) else None


def switch_target(prompt: str, kind: str) -> str:
    """B of a switch from A: the next colour, the next shape, or a turn (left -> up -> right -> down -> left)."""
    _, colour, shape, _, direction = prompt.split()
    if kind == "colour":
        colours = list(COLOURS)
        colour = colours[(colours.index(colour) + 1) % len(colours)]
    elif kind == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    elif kind == "axis":
        turn = ("left", "up", "right", "down")
        direction = turn[(turn.index(direction) + 1) % len(turn)]
    else:
        raise ValueError(f"switch kind {kind!r}: expected one of {KINDS}")
    return prompt_text(colour, shape, direction)


def summarise_latency(values: list[int | None]) -> dict:
    done = sorted(v for v in values if v is not None)
    return {"streams": len(values), "switched": len(done), "switched_fraction": len(done) / len(values),
            "median": done[len(done) // 2] if done else None, "mean": sum(done) / len(done) if done else None,
            "values": values}


# ---------------------------------------------------------------------------- the students
def load(run_dir: Path):
    """The run's student as inference.py loads it (latest step, EMA weights) and its evaluation items."""
    from hydra import compose, initialize_config_dir

    from engine.inference import prepare

    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl: expected a toy training run folder "
                                f"(python scripts/compare_methods.py --methods dmd,sid,causvid_tf --out <runs>)")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("inference", overrides=[f"checkpoint={run_dir}", "device=cpu"])
    plan = prepare(cfg, [], torch.device("cpu"))
    if plan.student.match_rule is None:
        raise ValueError(f"{run_dir}: not a toy-world student (no toy metrics)")
    return plan


def final_record(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    students = [r for r in rows if r["source"] == "student"]
    if not students:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no student evaluation")
    return max(students, key=lambda r: r["step"])


def pixels(student, latents: torch.Tensor) -> torch.Tensor:
    return student.vae.decode(latents).float().cpu()


@torch.no_grad()
def stream_clip(student, prompt: str, key: int, num_frames: int, switch: tuple[str, int, bool] | None = None):
    """[F, C, H, W] pixels of a Stream of known length (generate's noise), switched (prompt, frame, recache)."""
    from engine.stream import Stream

    stream = Stream(student, prompt, key=key, num_frames=num_frames)
    if switch is not None:
        stream.switch(switch[0], recache=switch[2], at=switch[1])
    latents = torch.cat([c.latents for c in stream])
    return pixels(student, latents[None])[0]


@torch.no_grad()
def batch_clips(student, items, num_frames: int) -> torch.Tensor:
    """[N, F, C, H, W]: inference's batch rollout of the items (the rolling window past the training length),
    which a stream of the same key and length equals (tests/test_stream.py)."""
    from engine.inference import generate

    latents, _, _ = generate(student, items, num_frames)
    return pixels(student, latents)


def study_method(name: str, run_dir: Path, args, segs: Segments, world: ToyWorld) -> dict:
    from engine.items import Item

    start = time.perf_counter()
    plan = load(run_dir)
    student, record = plan.student, final_record(run_dir)
    train = student.cfg.num_training_frames
    if vars(student.world) != vars(world):
        raise ValueError(f"{run_dir}: its toy world differs from the default one the segments were built from")
    items = plan.items[:: len(plan.items) // len(world.prompts)]  # one per prompt: the evaluation's first sample
    if [it.prompt for it in items] != world.prompts:
        raise RuntimeError(f"{run_dir}: the evaluation items are not one per toy prompt in order")
    items = items[: args.prompts]
    out = {"label": METHODS.get(name, name), "run_dir": str(run_dir), "step": record["step"],
           "training_frames": train, "record_match_rate": record["match_rate"]}

    # 3x: the run's evaluation, reproduced by streams of its noise keys
    long = record["long_num_frames"]
    check = []
    for it in plan.items[: args.check]:
        clip = stream_clip(student, it.prompt, it.noise_key, long)
        check.append(clip)
    if check:
        gap = evaluate(torch.stack(check), [it.prompt for it in plan.items[: args.check]], world)
        ref = evaluate(batch_clips(student, plan.items[: args.check], long), [it.prompt for it in plan.items[: args.check]],
                       world)
        out["stream_vs_batch_frame_error_gap"] = max(abs(a - b) for a, b in zip(gap["frame_error"], ref["frame_error"]))
    out["drift"] = {str(long): {"frames": long, "samples": record["num_samples"], "match_rate": record["long_match_rate"],
                                "mean_distance": record["long_mean_distance"], "frame_error": record["long_frame_error"],
                                "source": "the run's evaluation (metrics.jsonl)"}}
    log.info("%s: 3x from the run's evaluation; %d streams checked against the batch rollout", name, len(check))

    # 10x: one sample per prompt
    frames = args.long_factor * train
    clips = batch_clips(student, items, frames)
    scores = evaluate(clips, [it.prompt for it in items], world)
    shows = torch.stack([window_scores(c, segs).shows(segs.classes.index(prompt_class(it.prompt)))
                         for c, it in zip(clips, items)]).double()
    out["drift"][str(frames)] = {"frames": frames, "samples": len(items), "match_rate": scores["match_rate"],
                                 "mean_distance": scores["mean_distance"], "frame_error": scores["frame_error"],
                                 "window_shows_prompt": shows.mean(dim=0).tolist(), "source": "this script"}
    log.info("%s: %d frames, %.0f s so far", name, frames, time.perf_counter() - start)

    # switches: prompt p switched by kind p % 3, with its evaluation noise; B from the start with the same noise
    total, at = args.switch_frames or 3 * train, args.switch_at or train
    pairs = [(it, switch_target(it.prompt, KINDS[p % len(KINDS)]), KINDS[p % len(KINDS)]) for p, it in enumerate(items)]
    fresh = batch_clips(student, [Item(it.index, b, it.seed, it.stem) for it, b, _ in pairs], total)
    result = {"switch_at": at, "frames": total, "window": segs.window,
              "pairs": [{"from": it.prompt, "to": b, "kind": k} for it, b, k in pairs]}
    b_cls = [segs.classes.index(prompt_class(b)) for _, b, _ in pairs]
    a_cls = [segs.classes.index(prompt_class(it.prompt)) for it, _, _ in pairs]
    result["fresh"] = {"shows_new": torch.stack([window_scores(c, segs).shows(k) for c, k in zip(fresh, b_cls)]).tolist()}
    for mode, recache in (("recache", True), ("plain", False)):
        shows_new, shows_old = [], []
        for (it, b, _), kb, ka in zip(pairs, b_cls, a_cls):
            ws = window_scores(stream_clip(student, it.prompt, it.noise_key, total, (b, at, recache)), segs)
            shows_new.append(ws.shows(kb).tolist())
            shows_old.append(ws.shows(ka).tolist())
        result[mode] = {"shows_new": shows_new, "shows_old": shows_old}
        log.info("%s: switches with %s done, %.0f s so far", name, mode, time.perf_counter() - start)
    out["switch"] = result
    out["seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------- the report
def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def switch_table(methods: dict) -> tuple[list[str], list[list[str]]]:
    head = ["method", "switch", "kind", "streams", "show B within the horizon", "frames to B: median", "mean",
            "show B, windows after the switch", "still show A, first window after", "B from the start (ceiling)"]
    body = []
    for name, m in methods.items():
        sw = m["switch"]
        at = sw["switch_at"]
        for mode in ("recache", "plain"):
            for kind in (*KINDS, "all"):
                idx = [i for i, p in enumerate(sw["pairs"]) if kind == "all" or p["kind"] == kind]
                lat = summarise_latency([frames_to_switch(torch.tensor(sw[mode]["shows_new"][i]), at) for i in idx])
                after = mean(mean(sw[mode]["shows_new"][i][at:]) for i in idx)
                old = mean(sw[mode]["shows_old"][i][at] for i in idx)
                ceiling = mean(mean(sw["fresh"]["shows_new"][i][at:]) for i in idx)
                body.append([m["label"], mode, kind, str(len(idx)), f"{lat['switched_fraction']:.2f}",
                             "-" if lat["median"] is None else str(lat["median"]),
                             "-" if lat["mean"] is None else f"{lat['mean']:.1f}", f"{after:.2f}", f"{old:.2f}",
                             f"{ceiling:.2f}"])
    return head, body


def drift_table(methods: dict) -> tuple[list[str], list[list[str]]]:
    head = ["method", "match 12f (run)", "frames", "samples", "match (whole clip)", "mean distance",
            "frame err 1-12", "frame err 13-36", "frame err 37-120", "window shows the prompt: frames 1-12",
            "13-36", "37-120"]
    body = []
    for m in methods.values():
        train = m["training_frames"]
        for d in m["drift"].values():
            err, f = d["frame_error"], d["frames"]
            seg = [err[:train], err[train : 3 * train], err[3 * train :]]
            row = [m["label"], f"{m['record_match_rate']:.3f}", str(f), str(d["samples"]), f"{d['match_rate']:.3f}",
                   f"{d['mean_distance']:.3f}", *(f"{mean(s):.3f}" if s else "-" for s in seg)]
            shows = d.get("window_shows_prompt")
            if shows:  # window t covers frames t + 1 .. t + w (1-based); grouped by its first frame
                row += [f"{mean(s):.2f}" if s else "-" for s in (shows[:train], shows[train : 3 * train], shows[3 * train :])]
            else:
                row += ["-", "-", "-"]
            body.append(row)
    return head, body


def plot(methods: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in methods.values():
        for key, d in m["drift"].items():
            style = "-" if d["source"] == "this script" else ":"
            axes[0].plot(range(1, d["frames"] + 1), d["frame_error"], style, label=f"{m['label']}, {d['frames']} frames")
            if d.get("window_shows_prompt"):
                axes[1].plot(range(1, len(d["window_shows_prompt"]) + 1), d["window_shows_prompt"], label=m["label"])
    train = next(iter(methods.values()))["training_frames"]
    for ax in axes:
        ax.axvline(train + 0.5, color="grey", linestyle=":")
        ax.grid(alpha=0.3)
        ax.set_xlabel("frame")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("RMSE to the nearest own-prompt template")
    axes[0].set_title("per-frame error (dotted: 3x, the run's evaluation; solid: 10x)", fontsize=9)
    w = next(iter(methods.values()))["switch"]["window"]
    axes[1].set_ylabel(f"fraction whose {w}-frame window shows the prompt")
    axes[1].set_title("window starting at this frame shows the prompt (any phase)", fontsize=9)
    axes[1].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods.values()):
        sw = m["switch"]
        x = range(1, len(sw["fresh"]["shows_new"][0]) + 1)
        for mode, colour in (("recache", "tab:blue"), ("plain", "tab:orange")):
            ax.plot(x, [mean(c) for c in zip(*sw[mode]["shows_new"])], color=colour, label=f"{mode}: shows B")
            ax.plot(x, [mean(c) for c in zip(*sw[mode]["shows_old"])], color=colour, linestyle=":", label=f"{mode}: shows A")
        ax.plot(x, [mean(c) for c in zip(*sw["fresh"]["shows_new"])], color="black", linestyle="--", label="B from the start")
        ax.axvline(sw["switch_at"] + 0.5, color="grey", linestyle=":")
        ax.set_title(f"{m['label']}: switch at frame {sw['switch_at']}", fontsize=9)
        ax.set_xlabel(f"first frame of the {sw['window']}-frame window")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of streams")
    fig.tight_layout()
    fig.savefig(out / "switch.png", dpi=110)
    plt.close(fig)


def report(out: Path, command: str, revision: str) -> dict:
    methods = {}
    for name in METHODS:
        path = out / "methods" / f"{name}.json"
        if path.is_file():
            methods[name] = json.loads(path.read_text())
    if not methods:
        raise FileNotFoundError(f"{out / 'methods'} holds no method results: run the study first")
    first = next(iter(methods.values()))
    sw = first["switch"]
    plot(methods, out)
    drift_head, drift_body = drift_table(methods)
    switch_head, switch_body = switch_table(methods)
    summary = {"command": command, "git_revision": revision, "date": datetime.datetime.now().astimezone().isoformat(),
               "window": sw["window"], "switch_at": sw["switch_at"],
               "methods": {n: f"methods/{n}.json" for n in methods},  # every curve and per-stream result
               "drift": [dict(zip(drift_head, row)) for row in drift_body],
               "switch": [dict(zip(switch_head, row)) for row in switch_body]}
    (out / "stream_study.json").write_text(json.dumps(summary, indent=1))
    text = [
        "# Streams on the toy world: drift and prompt switches",
        "",
        "<!-- Generated by scripts/toy_stream_study.py: do not edit by hand; regenerate with the command below. -->",
        "",
        "- the methods' runs: " + "; ".join(sorted({f"`{m['command']}` at `{m['git_revision']}`" for m in methods.values()}))
        + f"; this report: `{command}` at `{revision}`",
        "- students: " + ", ".join(f"{m['label']} (`{m['run_dir']}`, step {m['step']})" for m in methods.values()),
        f"- rolling KV cache: window {first['training_frames']} frames (the training length), no sink; 3x and "
        f"{max(int(k) for k in first['drift']) // first['training_frames']}x the training length",
        f"- a window shows a prompt when its nearest {sw['window']}-frame template segment (any template, any phase "
        "of its bouncing path) has the prompt's colour, shape and motion axis and each of its frames lies within "
        "a one-pixel move of the segment's frame (docs/toy-world.md, Streams)",
        f"- switches: prompt p of the {len(sw['pairs'])} changes its {', '.join(KINDS)} (p mod 3), at latent frame {sw['switch_at']}, "
        f"streams of {sw['frames']} frames with the evaluation's noise of p; ceiling: B from frame 0 with the same noise",
        "",
        "## Drift",
        "",
        markdown(drift_head, drift_body),
        "",
        "![drift](drift.png)",
        "",
        "## Switches",
        "",
        "Frames to B: from the switch frame to the first window start whose window shows B (0: the first "
        f"{sw['window']} frames after the switch already do), over the streams that show B before the end; "
        "'show B within the horizon' is the fraction that do.",
        "",
        markdown(switch_head, switch_body),
        "",
        "![switch](switch.png)",
        "",
    ]
    (out / "stream_study.md").write_text("\n".join(text))
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(REPO / "outputs" / "stream_study" / "runs"),
                   help="compare_methods.py's --out: one run folder per method name")
    p.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {', '.join(METHODS)}")
    p.add_argument("--out", default=str(REPO / "docs" / "stream_study"))
    p.add_argument("--window", type=int, default=3, help="frames of the windows that are matched to the templates")
    p.add_argument("--long-factor", type=int, default=10, help="the long clips are this many training lengths")
    p.add_argument("--switch-at", type=int, default=None, help="latent frame of the switch (default: the training length)")
    p.add_argument("--switch-frames", type=int, default=None, help="length of switched streams (default: 3x training)")
    p.add_argument("--check", type=int, default=4, help="evaluation samples regenerated as streams and compared")
    p.add_argument("--prompts", type=int, default=48, help="the first N toy prompts (a quick look; the report says so)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from <out>/methods/*.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    command = shlex.join(["python", "scripts/toy_stream_study.py", *argv])
    revision = git_revision()
    if not args.report_only:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in METHODS]
        if unknown or not names:
            p.error(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
        world = ToyWorld()
        segs = segments(world, args.window)
        (out / "methods").mkdir(parents=True, exist_ok=True)
        for name in names:
            result = study_method(name, Path(args.runs) / name, args, segs, world)
            result.update(command=command, git_revision=revision)
            (out / "methods" / f"{name}.json").write_text(json.dumps(result))
            log.info("%s done in %.0f s", name, result["seconds"])
    return report(out, command, revision)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
