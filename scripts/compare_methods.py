"""Self Forcing's claims on the toy world: train every method at one budget, score all against the truth.

Trains, one after another in this process (CPU is fine; `--jobs N`: N at a time, a process each), from
the same initial weights (model.generator_init / critic_init) and seed: self-forcing DMD, self-forcing
SiD, CausVid with teacher forcing, CausVid with diffusion forcing, ODE regression on the exact
teacher's ODE, and DMD's relatives: DMD2 (DMD + GAN), Decoupled DMD, f-distill (JS, forward KL).
Every method gets the same training steps, batch size and generator/critic update ratio, read from
the composed config (configs/config.yaml) after the overrides. Each run evaluates its final
generator with the training evaluation (engine/evaluation.py, utils/toy_metrics.py): match rate,
coverage, mean distance and per-frame error at the training length and at
data.metrics.long_num_frames (rolling KV cache); the exact teacher's 50-step row comes from the
same runs (every run writes it, on the same seeds; they are checked to agree).

One run of a toy world's default is one draw: the same commit and settings move the DMD student's
match rate by tenths from one seed (or thread count) to another (docs/toy-world.md). `--seeds 0,1,2`
repeats every method once per training seed (the seed also draws the evaluation noise) and tables
each metric as the mean over the seeds with its range (min-max); without it, the single seed of the
composed config runs (`seed=N` overrides it), as one draw.

One run directory per method under --out (per method and seed with --seeds: <method>/seed_<N>); the
table is printed and written, with the command, budget, git revision and wall times, to
<docs>/compare_methods.md, and the per-frame error at the long length (with --seeds, the mean and the
seeds' range) to <docs>/compare_methods.png (needs matplotlib).

  python scripts/compare_methods.py                          # the full budget of configs/config.yaml
  python scripts/compare_methods.py --steps 20 --methods dmd,causvid_tf --docs /tmp/docs
  python scripts/compare_methods.py --steps 100 method.guidance_scale=2   # Hydra overrides go to every method
  python scripts/compare_methods.py --steps 300 --seeds 0,1,2   # mean and range over three training seeds
  python scripts/compare_methods.py --methods dmd,dmd2,decoupled_dmd,fdistill_js,fdistill_kl --seeds 0,1,2 \
      --jobs 2 --docs docs/dmd_family           # DMD's relatives, two runs at a time (one per core)
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from engine import config as config_schema  # noqa: E402  (registers the schema)
from utils.distributed import log0  # noqa: E402


@dataclass(frozen=True)
class Method:
    label: str                    # what the table calls it
    overrides: tuple[str, ...]    # Hydra overrides that select it
    target: str                   # the method class they must compose to
    teacher_forcing: bool = False


METHODS = {
    "dmd": Method("self forcing, DMD", ("method=dmd",), "model.dmd.DMD"),
    "sid": Method("self forcing, SiD", ("method=sid",), "model.sid.SiD"),
    "causvid_tf": Method("CausVid, teacher forcing", ("method=causvid", "method.teacher_forcing=true"),
                         "model.causvid.CausVid", teacher_forcing=True),
    "causvid_df": Method("CausVid, diffusion forcing", ("method=causvid",), "model.causvid.CausVid"),
    "ode_regression": Method("ODE regression", ("method=ode_regression",), "model.ode_regression.ODERegression"),
    # DMD's relatives: their toy presets are the default toy run with the method swapped (and the
    # discriminator's optimizer); the real clips of the GAN / f-distill discriminators are the toy templates
    "dmd2": Method("DMD2 (DMD + GAN)", ("experiment=toy_dmd2_gan",), "model.dmd2.DMD2"),
    "decoupled_dmd": Method("Decoupled DMD", ("experiment=toy_decoupled_dmd",), "model.decoupled_dmd.DecoupledDMD"),
    "fdistill_js": Method("f-distill, Jensen-Shannon", ("experiment=toy_fdistill_js",), "model.fdistill.FDistill"),
    "fdistill_kl": Method("f-distill, forward KL", ("experiment=toy_fdistill_js", "ablation=fdiv_kl"),
                          "model.fdistill.FDistill"),
}
# Set for every run before the user's overrides: evaluate and save only at the end, so the loop's
# wall time is training alone (a user who turns periodic evaluation back on pays it in that time).
RUN_DEFAULTS = ("eval.every=0", "eval.at_start=false", "checkpoint.every=0")
# Keys the script sets per method: an override of them would make every run the same method.
RESERVED = ("method=", "+method=", "method._target_=", "method.teacher_forcing=", "experiment=", "ablation=")
SEED_KEYS = ("seed=", "+seed=", "++seed=")  # set by --seeds when it is given
# Keys that must agree across the runs for the budget and the start to be equal.
BUDGET_KEYS = ("seed", "max_steps", "batch_size", "total_batch_size", "dfake_gen_update_ratio",
               "model.generator_init", "model.critic_init", "warm_start.generator_steps", "warm_start.critic_steps",
               "method.num_training_frames", "method.denoising_step_list", "data.metrics.long_num_frames",
               "data.metrics.samples_per_prompt", "data.metrics.teacher_steps")
TEACHER = "exact teacher"


def require_matplotlib():
    """Import matplotlib lazily (only this script draws); say how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("compare_methods.py draws docs/compare_methods.png with matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def select(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def compose_all(names: list[str], overrides: list[str], steps: int | None,
                seed: int | None = None) -> dict[str, DictConfig]:
    """One composed, validated config per method (at `seed`, else the config's); the budget keys must agree."""
    bad = [o for o in overrides if o.startswith(RESERVED)]
    if bad:
        raise SystemExit(f"overrides {bad} would change the method of every run; pick methods with --methods "
                         f"({', '.join(METHODS)})")
    tail = list(overrides) + ([f"max_steps={steps}"] if steps is not None else [])
    tail += [f"seed={seed}"] if seed is not None else []
    cfgs = {}
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for name in names:
            m = METHODS[name]
            cfg = compose("config", overrides=[*m.overrides, *RUN_DEFAULTS, *tail])
            if cfg.method._target_ != m.target or cfg.method.get("teacher_forcing", False) != m.teacher_forcing:
                raise SystemExit(f"{name}: the overrides composed method._target_={cfg.method._target_}, "
                                 f"teacher_forcing={cfg.method.get('teacher_forcing', False)}, expected {m.target}, "
                                 f"teacher_forcing={m.teacher_forcing} (does an experiment preset set the method?)")
            if cfg.data.metrics is None:
                raise SystemExit("the comparison scores samples against the toy world's truth: it needs data=toy")
            if cfg.data.metrics.long_num_frames <= cfg.method.num_training_frames:
                raise SystemExit(f"data.metrics.long_num_frames={cfg.data.metrics.long_num_frames} must exceed "
                                 f"method.num_training_frames={cfg.method.num_training_frames}: the comparison "
                                 "looks at errors past the training length")
            config_schema.validate(cfg)
            cfgs[name] = cfg
    first = names[0]
    for key in BUDGET_KEYS:
        values = {name: select(cfg, key) for name, cfg in cfgs.items()}
        if any(v != values[first] for v in values.values()):
            raise SystemExit(f"{key} differs between methods ({values}): the budget and start must be equal")
    return cfgs


def updates(cfg: DictConfig) -> tuple[int, int]:
    """(generator, critic) updates of a run, as the trainer makes them (engine/trainer.py updates_of)."""
    from engine.config import method_class
    from engine.trainer import updates_of

    phases = method_class(cfg).phases
    return updates_of(cfg, phases, "generator"), updates_of(cfg, phases, "critic")


def read_records(run_dir: Path, step: int) -> tuple[dict, dict]:
    """The run's final student record and its exact-teacher record, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    students = [r for r in rows if r["source"] == "student" and r["step"] == step]
    teachers = [r for r in rows if r["source"].startswith("exact_teacher")]
    if len(students) != 1 or len(teachers) != 1:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'}: expected one student record at step {step} and one teacher "
                           f"record, found {len(students)} and {len(teachers)}")
    return students[0], teachers[0]


def train_one(name: str, cfg: DictConfig, run_dir: Path) -> tuple[float, float]:
    """One method's run: (training loop seconds, whole run seconds)."""
    from train import train

    log0("=== %s (%s), seed %d: %d steps into %s", name, METHODS[name].label, cfg.seed, cfg.max_steps, run_dir)
    start = time.perf_counter()
    results = train(cfg, run_dir)
    return results["train_seconds"], time.perf_counter() - start


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


def run_all(cfgs: dict[int, dict[str, DictConfig]], out: Path, seed_dirs: bool = False,
            jobs: int = 1) -> tuple[dict[int, dict[str, dict]], dict[int, dict]]:
    """Train every method at every seed in its own run directory (out/<method>, or out/<method>/seed_<N>
    when `seed_dirs`), `jobs` runs at a time (each in its own process when more than one); per seed, every
    method's final record, wall times and updates, and the teacher's record."""
    tasks = [(seed, name, cfg, out / name / f"seed_{cfg.seed}" if seed_dirs else out / name)
             for seed, at_seed in cfgs.items() for name, cfg in at_seed.items()]
    if jobs == 1:
        times = [train_one(name, cfg, run_dir) for _, name, cfg, run_dir in tasks]
    else:  # a process per run (spawned: no torch state shared); the toy runs use threads=1 each
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_logging) as pool:
            times = list(pool.map(train_one, *zip(*[(name, cfg, run_dir) for _, name, cfg, run_dir in tasks])))
    runs: dict[int, dict[str, dict]] = {}
    teachers: dict[int, dict] = {}
    for (seed, name, cfg, run_dir), (train_seconds, total) in zip(tasks, times):
        record, ref = read_records(run_dir, cfg.max_steps)
        teacher = teachers.setdefault(seed, ref)
        if ref != teacher:  # same seed, same world: the reference rows must be the same samples
            raise RuntimeError(f"the exact teacher's record of {name} differs from the first run's: {ref} vs {teacher}")
        gen, critic = updates(cfg)
        runs.setdefault(seed, {})[name] = {"record": record, "train_seconds": train_seconds, "total_seconds": total,
                                           "generator_updates": gen, "critic_updates": critic, "run_dir": str(run_dir)}
    return runs, teachers


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def columns(short: int, long: int, train_frames: int) -> list[str]:
    return ["method", "gen / critic updates", "train s", "run s",
            f"match {short}f", f"match {short}f / teacher", f"coverage {short}f", f"distance {short}f",
            f"frame err {short}f", f"match {long}f", f"coverage {long}f", f"distance {long}f",
            f"frame err {long}f (1-{train_frames})", f"frame err {long}f ({train_frames + 1}-{long})"]


def metrics(record: dict, train_frames: int, teacher: dict) -> list[float | None]:
    """The table's numbers of one record, after the wall-time columns (frame errors: means over the named frames;
    match / teacher: None when the teacher matches nothing)."""
    long_err = record["long_frame_error"]
    ratio = record["match_rate"] / teacher["match_rate"] if teacher["match_rate"] > 0 else None
    return [record["match_rate"], ratio, record["coverage"], record["mean_distance"], mean(record["frame_error"]),
            record["long_match_rate"], record["long_coverage"], record["long_mean_distance"],
            mean(long_err[:train_frames]), mean(long_err[train_frames:])]


def cell(values: list[float | None], fmt: str = "{:.3f}") -> str:
    """One value as it is; several (one per seed) as `mean (min-max)`; '-' where there is none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "-"
    if len(values) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(mean(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def table_row(label: str, records: list[dict], teachers: list[dict], train_frames: int,
              costs: list[dict] | None) -> list[str]:
    """One table row over the seeds' records (the i-th record against the i-th seed's teacher), 3 decimals."""
    per_seed = [metrics(r, train_frames, t) for r, t in zip(records, teachers)]
    numbers = [cell([m[i] for m in per_seed]) for i in range(len(per_seed[0]))]
    if not costs:
        return [label, "-", "-", "-", *numbers]
    budget = sorted({f"{c['generator_updates']} / {c['critic_updates']}" for c in costs})
    return [label, ", ".join(budget), cell([c["train_seconds"] for c in costs], "{:.1f}"),
            cell([c["total_seconds"] for c in costs], "{:.1f}"), *numbers]


def match_text(record: dict) -> str:
    """How a sample counted as a match in `record` (an absolute threshold, or a move of the template)."""
    if record.get("threshold") is not None:
        return f"threshold {record['threshold']} (distance)"
    return f"radius: the template moved by {record['match_tolerance_px']:g} pixel (utils/toy_metrics.py)"


def markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def markdown_table(runs: dict[int, dict[str, dict]], teachers: dict[int, dict], train_frames: int) -> str:
    """Methods in the order they ran, then the exact teacher; numbers straight from the metrics.jsonl records,
    one per seed (`runs[seed][method]`), as the mean and range over the seeds when there are several."""
    seeds = list(runs)
    names = list(runs[seeds[0]])
    ts = [teachers[s] for s in seeds]
    body = [table_row(f"{METHODS[n].label} (`{n}`)", [runs[s][n]["record"] for s in seeds], ts, train_frames,
                      [runs[s][n] for s in seeds]) for n in names]
    body.append(table_row(f"{TEACHER} ({ts[0]['source']})", ts, ts, train_frames, None))
    return markdown(columns(ts[0]["num_frames"], ts[0]["long_num_frames"], train_frames), body)


def seed_table(runs: dict[int, dict[str, dict]], teachers: dict[int, dict]) -> str:
    """The match rate at the training length of every run: one row per method, one column per seed."""
    seeds = list(runs)
    short = teachers[seeds[0]]["num_frames"]
    body = [[f"{METHODS[n].label} (`{n}`)", *(f"{runs[s][n]['record']['match_rate']:.3f}" for s in seeds)]
            for n in runs[seeds[0]]]
    body.append([f"{TEACHER} ({teachers[seeds[0]]['source']})", *(f"{teachers[s]['match_rate']:.3f}" for s in seeds)])
    return markdown([f"match {short}f", *(f"seed {s}" for s in seeds)], body)


def git_revision() -> str:
    """`git rev-parse --short HEAD`, with -dirty when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return f"not a git checkout ({head.stderr.strip()})"
    dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def plot(plt, runs: dict[int, dict[str, dict]], teachers: dict[int, dict], train_frames: int, path: Path) -> None:
    """Per-frame error at the long length, one line per method plus the teacher (the mean over the seeds, the
    seeds' range shaded); a line at the training length."""
    seeds = list(runs)

    def draw(ax, errs: list[list[float]], **style):
        frames = range(1, len(errs[0]) + 1)
        line, = ax.plot(frames, [mean(e) for e in zip(*errs)], **style)
        if len(errs) > 1:
            ax.fill_between(frames, [min(e) for e in zip(*errs)], [max(e) for e in zip(*errs)],
                            color=line.get_color(), alpha=0.15, linewidth=0)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in runs[seeds[0]]:
        draw(ax, [runs[s][name]["record"]["long_frame_error"] for s in seeds], label=METHODS[name].label, marker=".")
    draw(ax, [teachers[s]["long_frame_error"] for s in seeds], label=f"{TEACHER} ({teachers[seeds[0]]['source']})",
         color="black", linestyle="--")
    ax.axvline(train_frames + 0.5, color="grey", linestyle=":", label=f"training length ({train_frames} frames)")
    ax.set_xlabel("frame index")
    ax.set_ylabel("RMSE to the nearest own-prompt template")
    over = f"; mean over seeds {', '.join(map(str, seeds))}, range shaded" if len(seeds) > 1 else ""
    ax.set_title(f"Toy world: error per frame over {len(teachers[seeds[0]]['long_frame_error'])}-frame rollouts "
                 f"(rolling KV cache){over}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def document(command: str, cfg: DictConfig, runs: dict[int, dict[str, dict]], table: str, out: Path, png: Path,
             started: str, revision: str, seed_dirs: bool, per_seed: str | None) -> str:
    m = cfg.data.metrics
    seeds = list(runs)
    first = next(iter(runs[seeds[0]].values()))["record"]
    total_batch = cfg.total_batch_size or cfg.batch_size
    several = len(seeds) > 1
    seed_text = (f"training seeds {', '.join(map(str, seeds))}, one run per method and seed" if several
                 else f"training seed {seeds[0]}")
    lines = [
        "# Method comparison on the toy world",
        "",
        "<!-- Generated by scripts/compare_methods.py: do not edit by hand; regenerate with the command below. -->",
        "",
        f"- command: `{command}`",
        f"- git revision: `{revision}`; date: {started}",
        f"- budget, the same for every method: {cfg.max_steps} training steps, batch size {cfg.batch_size} "
        f"(total {total_batch}), one generator update every {cfg.dfake_gen_update_ratio} steps and a critic update every "
        f"step (ODE regression has no critic: a generator update every step); torch CPU threads per process: "
        f"{cfg.threads if cfg.threads is not None else 'torch default'}",
        f"- start: generator `{cfg.model.generator_init or 'random init'}`, critic `{cfg.model.critic_init}`; "
        f"{seed_text} (random initial weights are drawn from the seed too)",
        f"- evaluation: {first['num_samples']} samples ({m.samples_per_prompt} per prompt), noise seed = the training "
        f"seed, the same for every method and the teacher, at {first['num_frames']} frames and at "
        f"{first['long_num_frames']} frames (training length {cfg.method.num_training_frames}; longer clips roll the KV "
        f"cache over that many frames); match {match_text(first)}; "
        f"ideal coverage with this many samples {first['coverage_ideal']:.3f}",
        f"- the exact teacher: {m.teacher_steps}-step Euler on its own flow, no guidance",
        f"- runs: `{out}/<method>/{'seed_<N>/' if seed_dirs else ''}` (metrics.jsonl, checkpoints, sample grids)",
        "",
        ("Each cell is the mean over the seeds and, in brackets, their range (min-max); one seed is one draw, and "
         "the toy's metrics move by tenths between draws (docs/toy-world.md). " if several else
         "One seed: each number is one draw, and the toy's metrics move by tenths between draws "
         "(docs/toy-world.md); `--seeds 0,1,2` gives the mean and range. ") +
        "Wall time: `train s` is the training loop, `run s` the whole run (building, the teacher's reference row, "
        "the final checkpoint and evaluation). Distance: mean distance to the nearest template; frame err: mean over "
        "the named frames of the per-frame RMSE to the nearest template of the sample's prompt.",
        "",
        table,
        "",
    ]
    if per_seed:
        lines += ["The match rate at the training length, run by run:", "", per_seed, ""]
    lines += [f"![frame error against frame index]({png.name})", ""]
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; distinct, non-negative integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds takes distinct non-negative integers like 0,1,2, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="training steps of every method (default: max_steps)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: every method runs once per seed and the table "
                        "gives each metric's mean and range (default: the config's single seed)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (e.g. the CPU's cores: the toy runs use one "
                        "thread each); the numbers do not depend on it, the wall times do")
    p.add_argument("--out", default=None, help="run folders, one per method (default: outputs/compare_methods/<time>)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="where compare_methods.md and .png are written")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method, e.g. batch_size=4")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        p.error(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        p.error(f"--methods names a method twice: {names}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.seeds is not None and any(o.startswith(SEED_KEYS) for o in args.overrides):
        p.error("give the seeds either with --seeds or as a seed= override, not both")
    plt = require_matplotlib()  # before hours of training, not after

    started = datetime.datetime.now().astimezone()
    revision = git_revision()  # the code that runs; read before this run writes docs/ (which would read as -dirty)
    out = Path(args.out or REPO / "outputs" / "compare_methods" / started.strftime("%Y-%m-%d_%H-%M-%S"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: its runs' metrics.jsonl would mix with new ones; "
                         "remove it or give another folder")
    seed_dirs = args.seeds is not None
    # every config is composed and checked before the first run trains
    cfgs = {}
    for seed in args.seeds or [None]:
        at_seed = compose_all(names, args.overrides, args.steps, seed)
        cfgs[next(iter(at_seed.values())).seed] = at_seed
    runs, teachers = run_all(cfgs, out, seed_dirs, args.jobs)

    cfg = next(iter(next(iter(cfgs.values())).values()))
    train_frames = cfg.method.num_training_frames
    table = markdown_table(runs, teachers, train_frames)
    per_seed = seed_table(runs, teachers) if len(runs) > 1 else None
    print(table)
    if per_seed:
        print(per_seed)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    png, md = docs / "compare_methods.png", docs / "compare_methods.md"
    plot(plt, runs, teachers, train_frames, png)
    command = shlex.join(["python", "scripts/compare_methods.py", *argv])
    md.write_text(document(command, cfg, runs, table, out, png, started.strftime("%Y-%m-%d %H:%M %Z"), revision,
                           seed_dirs, per_seed))
    log0("wrote %s and %s; runs in %s", md, png, out)
    return {"runs": runs, "teachers": teachers, "table": table, "seed_table": per_seed, "markdown": md, "png": png}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
