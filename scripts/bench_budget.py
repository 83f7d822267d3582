"""Distillation on a budget (issue 25): start-up memory before and after sharded loading, and the memory and
step time of LoRA / int8 training configurations on one GPU.

One command on the GPU machine (random weights, written under --root first; about 7.5 minutes on one H200):

  python scripts/bench_budget.py --root /tmp/budget --out /tmp/budget/result.json --md /tmp/budget/result.md

1. Folders: a random Wan2.1-T2V-1.3B folder (scripts/make_random_wan_folder.py) whose text encoder is
   replaced by a UMT5 of the real depth and width (24 layers, 4096 wide, the tiny tokenizer's vocabulary),
   and a random Wan2.1-T2V-14B transformer folder (bf16, initialised on the GPU).
2. Start-up: `--ranks` processes (gloo; on one GPU they share it) build the networks of a training config
   exactly as the trainer does (build_method on the FSDP mesh), with model.sharded_loading=false (every
   rank loads whole networks, then shards: the old path) and =true (meta-device build, shard, each rank
   reads its rows). Per rank, sampled every 20 ms: peak host memory (anonymous RSS: the process's own;
   file RSS: memory-mapped weight files, page cache shared by every rank and reclaimable) and peak GPU
   memory allocated. Loading needs no collective, so ranks may share a GPU. `--startup-configs
   teacher14b_lora_int8 --ranks 1 --parts startup` measures the 14B int8 teacher's start-up (about 4 more
   minutes: the old path builds it in float32 on the host first).
3. Precision: the 1.3B teacher's flow on one fixed 21-frame clip stored in fp32, bf16, int8 and fp8 (on a GPU
   with fp8): relative errors against bf16 and fp32.
4. Training (scripts/bench_train.py, one GPU, one process each): generator and critic steps at exit step 3
   (the longest rollout) of experiment=self_forcing_dmd with full fine-tuning, with LoRA rank 128 student and
   critic, with LoRA + int8 teacher and text encoder, and model=wan2.1_t2v_1.3b_teacher14b (the 14B teacher)
   with LoRA + int8 (`--configs lora_fp8` adds fp8). Compiled blocks and element-wise kernels are off (model.compile_blocks /
   fused_elementwise=false) to keep the run short: compiling takes about a minute per configuration and
   changes step time, not memory (docs/performance.md has the compiled step times).

Each part is written to --out as soon as it ends, so a run stopped by a time limit keeps what it measured;
a configuration that fails is recorded with its error and the others still run. --md writes the tables.

At tiny size on the CPU (the tests' random Wan folder; checks the script's path, its numbers mean nothing):

  python scripts/bench_budget.py --tiny --root /tmp/budget_tiny --out /tmp/budget_tiny/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAN_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
PROMPTS = ["a red circle moving left", "the blue car moving right slowly", "a dog in the forest at sunset",
           "a white cat on the street"]
LORA = ["model.lora.generator.rank=128", "model.lora.critic.rank=128"]
DEFAULT_CONFIGS = ("full", "lora", "lora_int8", "teacher14b_lora_int8")
INT8 = ["model.precision.teacher=int8", "model.precision.text_encoder=int8"]


# ---------------------------------------------------------------- folders
def make_folders(root: Path, tiny: bool, device: torch.device, layers: int | None = None) -> dict[str, Path]:
    """{"wan": the 1.3B (or tiny) folder, "teacher14b": a folder with the 14B transformer, "prompts": a file}.
    layers: blocks of both transformers and the text encoder (at most 24) instead of the real depths, for a
    start-up check at real widths on a machine without a GPU's memory."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    if tiny:
        from tests.wan_folder import make_tiny_wan_folder

        wan = root / "wan-tiny"
        if not (wan / "transformer").is_dir():
            make_tiny_wan_folder(wan)
        return {"wan": wan, "teacher14b": wan, "prompts": prompts}
    suffix = "" if layers is None else f"-{layers}-layers"
    wan, big = root / f"wan-1.3b{suffix}", root / f"wan-14b{suffix}"
    if not (wan / "transformer").is_dir():
        from scripts.make_random_wan_folder import WAN_1_3B
        from scripts.make_random_wan_folder import main as make_random_wan_folder

        make_random_wan_folder(str(wan), transformer=False)
        write_text_encoder(wan / "text_encoder", device, layers)
        # float32, as Wan-AI/Wan2.1-T2V-1.3B-Diffusers stores it
        write_transformer(wan / "transformer", {**WAN_1_3B, "num_layers": layers or WAN_1_3B["num_layers"]}, device,
                          torch.float32)
    if not (big / "transformer" / "config.json").is_file():  # bf16: the 14B in float32 would not fit the disk
        write_transformer(big / "transformer", {**WAN_14B, "num_layers": layers or WAN_14B["num_layers"]}, device,
                          torch.bfloat16)
    return {"wan": wan, "teacher14b": big, "prompts": prompts}


def write_text_encoder(folder: Path, device: torch.device, layers: int | None = None) -> None:
    """UMT5-XXL's encoder at its real width and depth (or `layers`), the tiny tokenizer's vocabulary, bf16,
    built on `device`."""
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.wan_folder import VOCAB

    config = {**UMT5_XXL, "num_layers": min(layers or UMT5_XXL["num_layers"], UMT5_XXL["num_layers"])}
    shutil.rmtree(folder, ignore_errors=True)  # make_random_wan_folder's one-layer encoder: no stale shard may stay
    with torch.device(device):
        model = UMT5EncoderModel(UMT5Config(vocab_size=len(VOCAB), **config)).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")


def write_transformer(folder: Path, config: dict, device: torch.device, dtype: torch.dtype) -> None:
    """A Wan transformer with diffusers' initialisation, built on `device` (a 14B one in seconds on a GPU)."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype)
    model.save_pretrained(folder, max_shard_size="10GB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- start-up memory
class MemorySampler:
    """Peak anonymous and file-backed RSS of this process, sampled every `every` seconds on a thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak = every, {"rss_anon": 0, "rss_file": 0, "rss": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        fields = {"RssAnon:": "rss_anon", "RssFile:": "rss_file", "VmRSS:": "rss"}
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split()[0] if line else ""
            if key in fields:
                out[fields[key]] = int(line.split()[1]) * 1024
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for k, v in self.read().items():
            self.peak[k] = max(self.peak[k], v)


def startup_rank(rank: int, world: int, port: int, overrides: list[str], device_type: str, out: Path) -> None:
    """One rank: build the method on the mesh as the trainer does, recording its memory peaks."""
    # no LOCAL_RANK: DeviceMesh would move rank r to GPU r, and the ranks may share one GPU
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("LOCAL_RANK", None)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from torch.distributed.device_mesh import init_device_mesh

    from engine.build import build_method
    from engine.config import compose_checked
    from utils.rng import seed_everything

    cfg = compose_checked(overrides)
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group("gloo")  # no collective runs while loading, so ranks may share a GPU
    baseline = MemorySampler.read()
    with MemorySampler() as sampler:
        start = time.perf_counter()
        mesh = init_device_mesh(device.type, (world,))
        seed_everything(cfg.seed, 0)
        method = build_method(cfg, device, mesh)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    gib = 2**30
    result = {
        "rank": rank, "build_s": round(seconds, 2),
        "host_anon_peak_gib": round(sampler.peak["rss_anon"] / gib, 3),
        "host_anon_before_gib": round(baseline["rss_anon"] / gib, 3),
        "host_file_peak_gib": round(sampler.peak["rss_file"] / gib, 3),
        "host_rss_peak_gib": round(sampler.peak["rss"] / gib, 3),
    }
    if device.type == "cuda":
        result["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / gib, 3)
        result["gpu_allocated_after_gib"] = round(torch.cuda.memory_allocated(device) / gib, 3)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    del method
    torch.distributed.destroy_process_group()


def startup(overrides: list[str], ranks: int, device_type: str, work: Path) -> dict:
    """Both loading paths of one config on `ranks` fresh processes each: per-rank peaks, their sums and maxima."""
    import torch.multiprocessing as mp

    from tests.dist_setup import free_port

    result = {}
    for mode in ("eager", "sharded"):
        out = work / mode
        out.mkdir(parents=True, exist_ok=True)
        args = [*overrides, f"model.sharded_loading={'true' if mode == 'sharded' else 'false'}"]
        try:
            mp.spawn(startup_rank, args=(ranks, free_port(), args, device_type, out), nprocs=ranks, join=True)
        except Exception as e:  # recorded, and the other parts still run
            result[mode] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
            continue
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        summary = {"per_rank": per_rank}
        for key in per_rank[0]:
            if key.endswith("_gib"):
                summary[f"{key}_sum"] = round(sum(r[key] for r in per_rank), 3)
                summary[f"{key}_max"] = round(max(r[key] for r in per_rank), 3)
        summary["build_s_max"] = max(r["build_s"] for r in per_rank)
        result[mode] = summary
    return result


# ---------------------------------------------------------------- int8 / fp8 against bf16
def precision_worker(rank: int, folder: str, device_type: str, tiny: bool, out: Path) -> None:
    """The 1.3B teacher's flow on one fixed clip (21 latent frames of 60 x 104, random text of 512 x 4096;
    tiny: the tiny folder's shapes) stored in fp32, bf16, int8 and (on a GPU with fp8) fp8: relative errors."""
    from engine.quantize import set_precision
    from model.wan.fp8 import fp8_unsupported
    from model.wan.weights import load_backbone

    device = torch.device(device_type)
    g = torch.Generator().manual_seed(0)
    shape, text = ((1, 2, 4, 4, 4), (1, 16, 16)) if tiny else ((1, 21, 16, 60, 104), (1, 512, 4096))
    x = torch.randn(shape, generator=g).to(device)
    t = torch.full(shape[:2], 500.0, device=device)
    context = torch.randn(text, generator=g).to(device)
    reference = load_backbone(folder).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        flows = {"fp32": reference(x, t, context).float()}
        reference.to(torch.bfloat16)
        flows["bf16"] = reference(x, t, context).float()
        kinds = ["int8"] + (["fp8"] if fp8_unsupported(device) is None else [])
        for kind in kinds:
            model = load_backbone(folder).to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
            flows[kind] = set_precision(model, "teacher", kind)(x, t, context).float()
            del model

    def rel(a, b):
        return round(((flows[a] - flows[b]).norm() / flows[b].norm()).item(), 5)

    result = {"bf16_vs_fp32": rel("bf16", "fp32"), **{f"{k}_vs_bf16": rel(k, "bf16") for k in kinds},
              **{f"{k}_vs_fp32": rel(k, "fp32") for k in kinds}}
    (out / "precision.json").write_text(json.dumps(result))


def precision(folder: Path, device_type: str, tiny: bool, work: Path) -> dict:
    import torch.multiprocessing as mp

    work.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(precision_worker, args=(str(folder), device_type, tiny, work), nprocs=1, join=True)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
    return json.loads((work / "precision.json").read_text())


# ---------------------------------------------------------------- training steps
def train_step(overrides: list[str], work: Path, tiny: bool, timeout: int) -> dict:
    """scripts/bench_train.py at exit step 3 (1 warm-up step, 1 timed, of each kind) in its own process."""
    out = work / "result.json"
    work.mkdir(parents=True, exist_ok=True)
    exit_step = "1" if tiny else "3"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--steps", "1", "--warmup", "1",
           "--exit-steps", exit_step, "--out", str(out), *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "overrides": overrides}
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-600:], "overrides": overrides, "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


# ---------------------------------------------------------------- the run
def common_overrides(paths: dict, tiny: bool, compile_: bool) -> list[str]:
    base = ["experiment=self_forcing_dmd", f"model.path={paths['wan']}", f"data.prompts.path={paths['prompts']}"]
    if tiny:
        from tests.wan_folder import Z_DIM

        return base + ["model.dtype=float32", f"model.latent_shape=[{Z_DIM},4,4]", "model.gradient_checkpointing=false",
                       "device=cpu", "method.num_training_frames=2", "method.num_frame_per_block=1",
                       "method.denoising_step_list=[1000,500]", "total_batch_size=null", "model.text_encoder.text_len=16"]
    flags = [] if compile_ else ["model.compile_blocks=false", "model.fused_elementwise=false"]
    return base + flags


def configs(paths: dict, tiny: bool) -> dict[str, list[str]]:
    teacher14b = ["model=wan2.1_t2v_1.3b_teacher14b", f"model.teacher_path={paths['teacher14b']}"]
    return {
        "full": [],
        "lora": LORA,
        "lora_int8": LORA + INT8,
        "teacher14b_lora_int8": teacher14b + LORA + INT8,
        "lora_fp8": LORA + ["model.precision.teacher=fp8", "model.precision.text_encoder=fp8"],  # not in the default run
    }


def markdown(result: dict) -> str:
    lines = []
    if result.get("startup"):
        lines = ["| start-up (`--ranks %s`) | path | host anon. peak, max / sum over ranks | host file-backed peak, max | "
                 "GPU peak allocated, max / sum | build time |" % result.get("ranks"), "| --- | --- | --- | --- | --- | --- |"]
    for name, modes in result.get("startup", {}).items():
        for mode, r in modes.items():
            if "error" in r:
                lines.append(f"| {name} | {mode} | {r['error']} | | | |")
                continue
            gpu = (f"{r['gpu_peak_allocated_gib_max']:.2f} / {r['gpu_peak_allocated_gib_sum']:.2f} GiB"
                   if "gpu_peak_allocated_gib_max" in r else "")
            lines.append(f"| {name} | {mode} | {r['host_anon_peak_gib_max']:.2f} / {r['host_anon_peak_gib_sum']:.2f} GiB | "
                         f"{r['host_file_peak_gib_max']:.2f} GiB | {gpu} | {r['build_s_max']:.0f} s |")
    if result.get("precision"):
        lines += ["", "| the 1.3B teacher's flow, relative error | " + " | ".join(result["precision"]) + " |",
                  "| --- |" + " --- |" * len(result["precision"]),
                  "| | " + " | ".join(str(v) for v in result["precision"].values()) + " |"]
    if result.get("training"):
        lines += ["", "| training config (one GPU) | generator step | critic step | weights after build | "
                  "peak allocated / reserved |", "| --- | --- | --- | --- | --- |"]
    for name, r in result.get("training", {}).items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        peak = (f"{r['peak_allocated_gib_per_gpu'][0]:.1f} / {r['peak_reserved_gib_per_gpu'][0]:.1f} GiB"
                if r.get("peak_allocated_gib_per_gpu") else "")
        weights = f"{r['weights_gib']:.1f} GiB" if r.get("weights_gib") is not None else ""
        lines.append(f"| {name} | {r['generator_step_s']:.2f} s | {r['critic_step_s']:.2f} s | {weights} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/budget", help="where the random-weight folders are written (reused if there)")
    p.add_argument("--out", required=True, help="the JSON result (rewritten after each part)")
    p.add_argument("--md", default=None, help="also write the tables as markdown here")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny Wan folder on the CPU: checks the script's path")
    p.add_argument("--ranks", type=int, default=2, help="start-up processes (on one GPU they share it)")
    p.add_argument("--parts", default="startup,precision,training", help="comma-separated: startup, precision, training")
    p.add_argument("--startup-configs", default="full", help="comma-separated configs whose start-up is measured "
                   "(full: the 1.3B networks; teacher14b_lora_int8: the 14B int8 teacher, whose eager path builds "
                   "it in float32 on the host first: 84 GB per rank, so use --ranks 1)")
    p.add_argument("--configs", default=None, help="comma-separated training configs (default: full, lora, lora_int8, "
                                                   "teacher14b_lora_int8; also lora_fp8)")
    p.add_argument("--layers", type=int, default=None, help="blocks of the random transformers (and text encoder, at "
                   "most 24) instead of the real depths: a start-up check at real widths on a smaller machine")
    p.add_argument("--compile", action="store_true", help="keep compiled blocks and kernels on in the training steps")
    p.add_argument("--timeout", type=int, default=300, help="seconds per training config")
    args = p.parse_args(argv)
    names = set(configs({"wan": "", "teacher14b": "", "prompts": ""}, args.tiny))
    for flag, given in (("--startup-configs", args.startup_configs), ("--configs", args.configs or "")):
        unknown = set(filter(None, given.split(","))) - names
        if unknown:
            raise SystemExit(f"{flag}: unknown {sorted(unknown)}; known: {sorted(names)}")
    if not set(args.parts.split(",")) <= {"startup", "precision", "training"}:
        raise SystemExit(f"--parts {args.parts}: expected some of startup, precision, training")
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    ranks = args.ranks
    root, out = Path(args.root), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "ranks": ranks, "tiny": args.tiny, "layers": args.layers,
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()}

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))
        if args.md:
            Path(args.md).write_text(markdown(result))

    start = time.perf_counter()
    paths = make_folders(root, args.tiny, device, args.layers)
    result["folders_s"] = round(time.perf_counter() - start, 1)
    print(f"folders ready in {result['folders_s']} s: {paths}", flush=True)
    common = common_overrides(paths, args.tiny, args.compile)
    chosen = configs(paths, args.tiny)
    chosen = {k: v for k, v in chosen.items() if k in (args.configs.split(",") if args.configs else DEFAULT_CONFIGS)}
    parts = args.parts.split(",")
    if "startup" in parts:
        result["startup"] = {}
        for name in args.startup_configs.split(","):
            t = time.perf_counter()
            base = [o for o in common if not o.startswith(("model.compile_blocks", "model.fused_elementwise"))]
            result["startup"][name] = startup(base + configs(paths, args.tiny)[name], ranks, device.type,
                                              root / "startup" / name)
            print(f"start-up {name}: {time.perf_counter() - t:.0f} s", json.dumps(
                {m: {k: v for k, v in r.items() if k != "per_rank"} for m, r in result["startup"][name].items()}),
                flush=True)
            save()
    if "precision" in parts:
        t = time.perf_counter()
        result["precision"] = precision(paths["wan"], device.type, args.tiny, root / "precision")
        print(f"precision: {time.perf_counter() - t:.0f} s", result["precision"], flush=True)
        save()
    if "training" in parts:
        result["training"] = {}
        for name, extra in chosen.items():
            r = train_step(common + extra, root / "training" / name, args.tiny, args.timeout)
            result["training"][name] = r
            print(f"training {name}: {r.get('wall_s')} s",
                  r.get("error") or {k: r.get(k) for k in ("generator_step_s", "critic_step_s", "weights_gib",
                                                           "peak_allocated_gib_per_gpu", "peak_reserved_gib_per_gpu")},
                  flush=True)
            save()
    result["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
