"""What evaluate.py writes (engine/evaluate.py makes the rows):

    <out>/videos/<row>/<index>_<prompt>_seed<s>.mp4   each model's own videos (teacher and every student)
    <out>/side_by_side/<index>_<prompt>_seed<s>.mp4  teacher | student | ... of one prompt and seed, labelled
    <out>/drift.png                                  per-frame consistency, flicker and CLIP score by frame
    <out>/vbench/<row>/                              VBench's own files, when it runs
    <out>/metrics.json                               per-prompt and mean scores, speed, what was skipped and why
    <out>/index.html                                 a page with the side-by-side videos and the tables

With videos=false only the scores are written (metrics.json, drift.png, index.html without players).

metrics.json is written last: a folder holding it is complete.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.validation import GRID_CELL
from utils.distributed import log0
from utils import video_metrics as vm
from utils.video import grid_video, write_video

SCORES = ("clip_score", "consistency", "flicker", "psnr_vs_teacher", "lpips_vs_teacher")  # table order
HIGHER_IS_BETTER = {"clip_score": True, "consistency": True, "flicker": False, "psnr_vs_teacher": True,
                    "lpips_vs_teacher": False}
CURVES = (("consistency", "CLIP consistency of frames t-1, t", 1), ("flicker", "flicker |x_t - x_(t-1)|", 1),
          ("clip_score", "CLIP text-frame score", 0))  # (key, title, first frame index)
TITLE_CHARS = 90  # prompt characters in a side-by-side header; metrics.json holds the whole prompt


def write_all(out_dir: Path, cfg, plans: list, rows: list, scorers, device, wall: dict, start: float) -> dict:
    """Every output file; returns metrics.json's content. `wall`: seconds by phase so far, `start`: the run's
    perf_counter at its start (the total includes this writing)."""
    items, first = plans[0].items, plans[0]
    pixel_frames = 1 + first.student.vae.temporal_compression * (first.num_frames - 1)
    skipped = dict(scorers.skipped)
    vbench, files = {}, None
    if cfg.videos:
        mark = time.perf_counter()
        files = write_videos(out_dir, cfg, items, rows)
        wall["write_videos_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        vbench = run_vbench(out_dir, cfg, items, rows, files, skipped, device)
        if vbench:
            wall["vbench_s"] = time.perf_counter() - mark
    elif cfg.vbench.dimensions:
        skipped["vbench"] = "VBench skipped: videos=false (it scores the mp4 files)"
    metrics = {
        "prompts": list(dict.fromkeys(it.prompt for it in items)),
        "seeds": list(dict.fromkeys(it.seed for it in items)),
        "num_frames": first.num_frames, "pixel_frames": pixel_frames, "fps": cfg.fps,
        "past_training_length": any(pixel_frames > r.info.get("training_pixel_frames", pixel_frames) for r in rows),
        "models": {r.name: r.info for r in rows},
        "mean": {r.name: mean_scores(r) | vbench.get(r.name, {}) for r in rows},
        "speed": {r.name: r.speed for r in rows},
        "wall": wall,
        "items": [{"index": it.index, "prompt": it.prompt, "seed": it.seed,
                   "side_by_side": files["side_by_side"][i] if files else None,
                   "videos": {r.name: files[r.name][i] for r in rows} if files else None,
                   "scores": {r.name: r.scores[i] for r in rows}} for i, it in enumerate(items)],
        "per_frame": {r.name: {k: vm.mean_curves([c[k] for c in r.curves]) for k in r.curves[0]} for r in rows},
        "clip": {"weights": cfg.clip.weights, "frames": cfg.clip.frames,
                 "backend": scorers.clip.backend if scorers.clip is not None else None},
        "skipped": skipped,
    }
    plot_drift(out_dir / "drift.png", metrics, rows)
    wall["total_s"] = time.perf_counter() - start
    (out_dir / "index.html").write_text(page(metrics), encoding="utf-8")
    bad: list[str] = []
    metrics = finite(metrics, "", bad)
    if bad:  # JSON has no NaN; a non-finite score (a model that output NaN) is null, and said so
        log0("metrics.json: %d values are not finite and are written as null: %s", len(bad),
             ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""), level=logging.WARNING)
    tmp = out_dir / ".metrics.partial.json"
    tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False))
    os.replace(tmp, out_dir / "metrics.json")
    for name, mean in metrics["mean"].items():
        log0("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in mean.items()))
    log0("evaluation -> %s (index.html, metrics.json)", out_dir)
    return metrics | {"output_dir": str(out_dir)}


def finite(value, path: str, bad: list):
    """`value` with every NaN / inf float replaced by None; their key paths appended to `bad`."""
    if isinstance(value, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path)
        return None
    return value


def mean_scores(row) -> dict:
    keys = [k for k in SCORES if k in row.scores[0]]
    return {k: float(np.mean([s[k] for s in row.scores])) for k in keys}


# ---------------------------------------------------------------------------- videos
def label(row) -> str:
    if row.name == "teacher":
        return f"teacher ({row.info['steps']} steps, CFG {row.info['guidance_scale']:g})"
    return f"{row.name} ({row.info['weights']})"


def write_videos(out_dir: Path, cfg, items, rows) -> dict:
    """Each row's mp4s and the side-by-side ones, written by a few threads (ffmpeg encodes in its own
    process); returns {row name or "side_by_side": [relative path per item]}."""
    files = {r.name: [f"videos/{r.name}/{it.stem}.mp4" for it in items] for r in rows}
    files["side_by_side"] = [f"side_by_side/{it.stem}.mp4" for it in items]
    h, w = rows[0].clips[0].shape[1:3]
    upscale = max(1, GRID_CELL // max(h, w))  # tiny clips (the toy's 8 x 8) made visible; Wan's stay as they are

    def side_by_side(i: int) -> None:
        it = items[i]
        clips = torch.stack([torch.from_numpy(r.clips[i]).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in rows])
        prompt = it.prompt if len(it.prompt) <= TITLE_CHARS else it.prompt[: TITLE_CHARS - 3] + "..."
        grid = grid_video(clips, [label(r) for r in rows], upscale=upscale, columns=len(rows), title=f"{prompt} | seed {it.seed}")
        write_video(out_dir / files["side_by_side"][i], grid, fps=cfg.fps)

    jobs = [(write_video, (out_dir / files[r.name][i], r.clips[i]), {"fps": cfg.fps}) for r in rows for i in range(len(items))]
    jobs += [(side_by_side, (i,), {}) for i in range(len(items))]
    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) // 2))) as pool:
        for future in [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in jobs]:
            future.result()  # an encoding error surfaces here
    return files


def run_vbench(out_dir: Path, cfg, items, rows, files: dict, skipped: dict, device) -> dict:
    """{row: {dimension: score}} for the dimensions whose weights are here; the others are named in `skipped`."""
    dims, cache, reasons = vm.vbench_dimensions(list(cfg.vbench.dimensions), cfg.vbench.cache_dir)
    for reason in reasons:
        log0("%s", reason, level=logging.WARNING)
    if reasons:
        skipped["vbench"] = "; ".join(reasons)
    results = {}
    for r in rows:
        if dims:
            prompts = {Path(files[r.name][i]).name: it.prompt for i, it in enumerate(items)}
            results[r.name] = {f"vbench_{k}": v for k, v in vm.run_vbench(
                out_dir / "videos" / r.name, prompts, dims, cache, out_dir / "vbench" / r.name, r.name, device).items()}
    return results


# ---------------------------------------------------------------------------- drift
def plot_drift(path: Path, metrics: dict, rows) -> None:
    """The per-frame curves (means over prompts) of every row, with the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in CURVES if c[0] in metrics["per_frame"][rows[0].name]]
    fig, axes = plt.subplots(len(curves), 1, figsize=(8, 2.6 * len(curves)), sharex=True, squeeze=False)
    trained = sorted({r.info["training_pixel_frames"] for r in rows if "training_pixel_frames" in r.info})
    for ax, (key, title, start) in zip(axes[:, 0], curves):
        for r in rows:
            values = metrics["per_frame"][r.name][key]
            ax.plot(range(start, start + len(values)), values, label=r.name, lw=1.2)
        for t in trained:
            if t < metrics["pixel_frames"]:
                ax.axvline(t - 0.5, color="grey", ls="--", lw=1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("frame" + (" (dashed: the training length)" if any(t < metrics["pixel_frames"] for t in trained) else ""))
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the page
def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else html.escape(str(v))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(m: dict) -> str:
    names = list(m["models"])
    keys = [k for k in dict.fromkeys(k for mean in m["mean"].values() for k in mean)]
    arrows = {k: (" ↑" if HIGHER_IS_BETTER.get(k, True) else " ↓") for k in keys}
    means = _table(["model", *[k + arrows[k] for k in keys]], [[n, *[m["mean"][n].get(k) for k in keys]] for n in names])
    speed = _table(["model", "frames/s", "first chunk s", "seconds"],
                   [[n, s.get("throughput_fps"), s.get("first_chunk_latency_s"), s.get("generation_s", s.get("timing", {}).get("generation_s"))]
                    for n, s in m["speed"].items()])
    notes = "".join(f"<li>{html.escape(v)}</li>" for v in m["skipped"].values())
    items = []
    for it in m["items"]:
        scores = [k for k in SCORES if any(k in s for s in it["scores"].values())]
        table = _table(["model", *scores], [[n, *[it["scores"][n].get(k) for k in scores]] for n in names])
        video = (f'<video src="{html.escape(it["side_by_side"])}" controls loop muted autoplay playsinline></video>'
                 if it["side_by_side"] else "")
        items.append(f'<section><h3>{it["index"]}. {html.escape(it["prompt"])} <small>seed {it["seed"]}</small></h3>'
                     f'{video}{table}</section>')
    frames = f'{m["num_frames"]} latent frames ({m["pixel_frames"]} video frames at {m["fps"]} fps)'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;background:#fafafa}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
video{{max-width:100%;display:block}} section{{margin:2em 0}} img{{max-width:100%}}</style></head><body>
<h1>Student vs teacher</h1><p>{len(m["items"])} videos per model, {frames}{"; past the training length" if m["past_training_length"] else ""}.
Columns of each video: {" | ".join(html.escape(n) for n in names)}.</p>
<h2>Mean scores</h2>{means}<h2>Speed</h2>{speed}<p>Wall time: {", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in m["wall"].items())}.</p>
{f"<h2>Skipped</h2><ul>{notes}</ul>" if notes else ""}
<h2>Per frame</h2><img src="drift.png" alt="per-frame scores">
<h2>Videos</h2>{"".join(items)}
</body></html>
"""
