"""Where a training step's time goes: host phases against GPU kernel time (a GPU tool).

Builds and shards the networks as bench_train.py does, runs warm-up steps, then records one step of
each kind (generator, critic) at a chosen exit step under torch.profiler and prints, per phase of the
trainer's step (text encoding, the rollout's generator calls with and without grad, the scores, the
backward, gradient clipping, the optimizer, the reshard), the host wall time and the GPU kernel time
it launched; the step's GPU idle time and the phase the host was in while the GPU waited; GPU time by
kernel kind; and the operators with the most host time.

  python scripts/profile_train.py experiment=self_forcing_dmd model.path=/tmp/wan \
      data.prompts.path=/tmp/prompts.txt --exit-step 0 --out profile_train.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_train import build_sharded, force_exit_steps  # noqa: E402
from scripts.profile_inference import kind_of  # noqa: E402
from engine.build import build_optimizer  # noqa: E402
from engine import trainer  # noqa: E402
from engine.config import optim_config  # noqa: E402
from engine.trainer import Optimized, run_phase  # noqa: E402
from engine.config import compose_checked  # noqa: E402
from utils.distributed import destroy, init_distributed, single_process_group  # noqa: E402

PHASES = ("text", "rollout fwd no-grad", "rollout fwd grad", "scores", "backward", "clip", "optimizer", "reshard")


@contextmanager
def annotated(method, optimizers):
    """Label the trainer's phases with record_function ranges (patched in for the profile only)."""
    from torch.autograd.profiler import record_function

    def wrap(obj, name, label):
        inner = getattr(obj, name)

        def labelled(*args, **kwargs):
            with record_function(label):
                return inner(*args, **kwargs)
        setattr(obj, name, labelled)
        return lambda: setattr(obj, name, inner)

    undo = [wrap(method, "encode", "text"), wrap(method, "guided_x0", "scores"),
            wrap(torch.Tensor, "backward", "backward"), wrap(torch.nn.utils, "clip_grad_norm_", "clip"),
            wrap(trainer, "reshard", "reshard")]
    undo += [wrap(opt, "step", "optimizer") for opt in optimizers]
    open_ranges, handles = [], []

    def pre(module, args):
        r = record_function("rollout fwd grad" if torch.is_grad_enabled() else "rollout fwd no-grad")
        r.__enter__()
        open_ranges.append(r)

    def post(module, args, out):
        open_ranges.pop().__exit__(None, None, None)

    # the generator's calls inside the rollout; its calls from the scores (critic, teacher) are other modules
    handles += [method.generator.register_forward_pre_hook(pre), method.generator.register_forward_hook(post)]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()
        for h in handles:
            h.remove()


def analyse(trace_path: str, top: int) -> dict:
    """Phases, GPU idle time and kernel kinds from a chrome trace of one step."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e.get("ph") == "X"]
    step = next(e for e in ranges if e["name"] == "step")
    start, end = step["ts"], step["ts"] + step["dur"]
    labelled = [e for e in ranges if e["name"] in PHASES]

    def phase_at(ts: float) -> str:  # the innermost labelled range holding host time ts
        inside = [e for e in labelled if e["ts"] <= ts <= e["ts"] + e["dur"]]
        return min(inside, key=lambda e: e["dur"])["name"] if inside else "other"

    host = defaultdict(float)
    for e in labelled:  # exclusive time of each label (nested labels subtracted)
        host[e["name"]] += e["dur"]
        parent = [p for p in labelled if p is not e and p["ts"] <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"]]
        if parent:
            host[min(parent, key=lambda p: p["dur"])["name"]] -= e["dur"]
    gpu, kinds = defaultdict(float), defaultdict(float)
    intervals = []
    for k in kernels:
        launch = launches.get(k["args"].get("correlation"))
        gpu[phase_at(launch["ts"]) if launch else "other"] += k["dur"]
        kinds[kind_of(k["name"])] += k["dur"]
        intervals.append((max(k["ts"], start), min(k["ts"] + k["dur"], end)))
    busy, idle_by_phase, cursor = 0.0, defaultdict(float), start
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if a > cursor:
            idle_by_phase[phase_at((a + cursor) / 2)] += a - cursor  # what the host was doing meanwhile
        busy += max(0.0, b - max(a, cursor))
        cursor = max(cursor, b)
    if end > cursor:
        idle_by_phase[phase_at((end + cursor) / 2)] += end - cursor
    names = sorted(set(host) | set(gpu) | set(idle_by_phase), key=lambda n: PHASES.index(n) if n in PHASES else 99)
    ms = lambda us: round(us / 1e3, 1)  # noqa: E731
    return {
        "step_ms": ms(end - start), "gpu_busy_ms": ms(busy), "gpu_idle_ms": ms(end - start - busy),
        "phases_ms": {n: {"host": ms(host.get(n, 0.0)), "gpu": ms(gpu.get(n, 0.0)), "gpu_idle": ms(idle_by_phase.get(n, 0.0))}
                      for n in names},
        "gpu_kinds_ms": {k: ms(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "host_in_rollout_calls_ms": host_breakdown(events, [e for e in labelled if e["name"].startswith("rollout")], top),
    }


def host_breakdown(events: list, windows: list, top: int) -> dict:
    """Host time inside `windows` (the rollout's generator calls) by outermost operator or range on the
    windows' thread (inclusive), and the rest: Python between operators (model code, hooks, wrappers)."""
    if not windows:
        return {}
    tid = windows[0]["tid"]
    spans = sorted(((w["ts"], w["ts"] + w["dur"]) for w in windows))
    merged = []
    for a, b in spans:  # nested windows (a grad call inside a checkpointed one) count once
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("tid") == tid and e.get("cat") in ("cpu_op", "user_annotation")
                  and not e["name"].startswith("rollout")), key=lambda e: (e["ts"], -e["dur"]))
    starts = [e["ts"] for e in ops]
    by_name, covered, total = defaultdict(float), 0.0, sum(b - a for a, b in merged)
    for a, b in merged:
        edge = a
        for e in ops[bisect.bisect_left(starts, a) : bisect.bisect_left(starts, b)]:
            if e["ts"] < edge:
                continue  # nested in the last outermost op
            d = min(e["ts"] + e["dur"], b) - e["ts"]
            by_name[re.sub(r" \(.*\)$", "", e["name"])] += d
            covered += d
            edge = e["ts"] + e["dur"]
    ranked = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:top])
    return {"total": round(total / 1e3, 1), "python between operators": round((total - covered) / 1e3, 1),
            **{k: round(v / 1e3, 1) for k, v in ranked.items()}}


def host_ops(prof, top: int) -> dict:
    """Operators by host time (self, ms, and calls), FSDP's per-module ranges summed over modules."""
    rows = defaultdict(lambda: [0.0, 0.0, 0])
    for e in prof.key_averages():
        name = re.sub(r" \(.*\)$", "", e.key)  # "FSDP::pre_forward (blocks.12)" -> "FSDP::pre_forward"
        rows[name][0] += e.self_cpu_time_total / 1e3
        rows[name][1] += e.cpu_time_total / 1e3
        rows[name][2] += e.count
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]
    return {name: {"self_ms": round(a, 1), "total_ms": round(b, 1), "calls": n} for name, (a, b, n) in ranked}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exit-step", type=int, default=0, help="every chunk's exit step in the profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps of each kind first")
    p.add_argument("--phases", default="generator,critic")
    p.add_argument("--top", type=int, default=40, help="operators listed by host time")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = compose_checked(["total_batch_size=null", *args.overrides])
    dist = init_distributed()
    single_process_group(dist)
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "exit_step": args.exit_step, "overrides": args.overrides}
    try:
        _, method, data = build_sharded(cfg, dist)
        force_exit_steps(method, [args.exit_step])
        networks = type(method).networks
        optimized = {name: Optimized(getattr(method, spec.attr),
                                     *build_optimizer(getattr(method, spec.attr).parameters(), optim_config(cfg, name),
                                                      args.warmup + 1), optim_config(cfg, name))
                     for name, spec in networks.items() if spec.trained}
        phases = {p.name: p for p in type(method).phases}
        for phase in args.phases.split(","):
            spec = phases[phase]
            opt = optimized[spec.updates[0]].optimizer

            def one_step(step):
                run_phase(method, spec, optimized, data, step, cfg.seed, dist, 1)

            for step in range(args.warmup):
                one_step(step)
            sync()
            begin = time.perf_counter()
            one_step(args.warmup)  # the same step unprofiled: its true wall time
            sync()
            unprofiled = time.perf_counter() - begin
            with tempfile.TemporaryDirectory() as tmp, annotated(method, [opt]):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    with torch.autograd.profiler.record_function("step"):
                        one_step(args.warmup)
                    sync()
                trace = str(Path(tmp) / "trace.json")
                prof.export_chrome_trace(trace)
                result[phase] = {"unprofiled_step_ms": round(unprofiled * 1e3, 1), **analyse(trace, args.top)}
            result[phase]["host_ops"] = host_ops(prof, args.top)
            if dist.is_main:
                print(f"== {phase} step, exit step {args.exit_step}")
                print(json.dumps(result[phase], indent=1), flush=True)
    finally:
        destroy()
    if dist.is_main and args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
