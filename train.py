"""Train a block-causal student: Self Forcing (DMD, SiD) or CausVid. Hydra entry point.

    python train.py                                   # the embedded default: DMD on the toy world
    python train.py method=sid max_steps=100          # override a knob
    python train.py -m method.guidance_scale=2,3,4    # a sweep
    python train.py hydra.run.dir=outputs/run1 resume=latest   # continue a run
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from utils import config as config_schema  # registers the typed schema
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from utils.build import Batches, backbone_config, build_method, build_optimizer, pick_device
from utils.checkpoint import CheckpointManager, resolve_resume
from utils.distributed import all_reduce_mean, destroy, init_distributed, log0, single_process_group
from utils.ema import EMA
from utils.evaluation import evaluate_toy
from utils.fsdp import build_mesh, reshard, shard_method
from utils.rng import get_rng_state, seed_everything, set_rng_state
from utils.tracker import ProgressBar, make_tracker
from utils.warm_start import warm_start


def step_update(method, phase, net, optimizer, scheduler, batches, step, cfg, dist, accumulation, optim_cfg=None):
    """One optimizer update of `net` (generator or critic) over the accumulated micro-batches."""
    loss_fn = method.generator_loss if phase == "generator" else method.critic_loss
    # The optimiser's parameters, not net.parameters(): a network kept gathered between forwards
    # (reshard_after_forward=false) lists its gathered bf16 copies there, which hold no gradients.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if dist.world_size > 1 and not isinstance(params[0], DTensor):
        raise RuntimeError(f"the {phase} is not sharded: on several ranks, shard it with utils.fsdp.shard_method first")
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accumulation):
        ids, batch = batches.get(step, micro, dist.rank)
        method.reseed(cfg.seed, step, phase, ids)
        loss, parts = loss_fn(batch)
        # FSDP averages over ranks the gradients of each sharded network the backward runs through;
        # backward(inputs=...) would skip that, so SiD's critic gets gradients too, dropped below.
        (loss / accumulation).backward()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=dist.device).detach() / accumulation
    for other in (method.generator, method.fake_score):
        if other is not net:
            other.zero_grad(set_to_none=True)
    # one all-reduce of the logged numbers: every rank sees the global batch's losses, and stops together on NaN
    names = sorted(sums)
    logs: dict[str, float] = dict(zip(names, all_reduce_mean(torch.stack([sums[k] for k in names])).tolist()))
    key = f"{phase}_loss"
    if not math.isfinite(logs[key]):
        raise FloatingPointError(
            f"{key} is {logs[key]} at step {step}: training stopped before the update, so no NaN weights were "
            "saved; resume from the last checkpoint with a lower learning rate or check the inputs"
        )
    optim_cfg = optim_cfg or (cfg.generator_optim if phase == "generator" else cfg.critic_optim)
    if optim_cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip)  # the whole model's norm, also from shards
        logs[f"{phase}_grad_norm"] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    optimizer.step()
    scheduler.step()
    # Networks kept gathered within a step (fsdp.reshard_after_forward=false) are freed between steps:
    # the next forward gathers the updated shards, and the EMA and checkpoints see the fp32 shards.
    reshard(method.generator)
    reshard(method.fake_score)
    return logs


def generator_updates(cfg: DictConfig, has_critic: bool) -> int:
    """Generator updates in a run: one every dfake_gen_update_ratio steps, or every step without a critic."""
    return math.ceil(cfg.max_steps / (cfg.dfake_gen_update_ratio if has_critic else 1))


def export_of(method, ema: EMA | None, cfg: DictConfig) -> dict:
    """The inference weights, consolidated on rank 0 (a collective): EMA once it has started, else the generator."""
    if ema is not None and ema.active:
        weights = ema.full_state_dict(rank0_only=True)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets them, on the CPU
        weights = get_model_state_dict(method.generator, options=options)
    config = {
        "backbone": backbone_config(cfg),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=False),
        "data": OmegaConf.to_container(cfg.data, resolve=False),
        "weights": "ema" if ema is not None and ema.active else "generator",
    }
    return {"weights": weights, "config": config}


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train on every rank of a torchrun job, or as world size 1 of the same code (a one-rank group)."""
    dist = init_distributed()
    own_group = single_process_group(dist)
    try:
        return _train(cfg, run_dir, dist)
    finally:
        if own_group:
            destroy()


def _train(cfg: DictConfig, run_dir: Path, dist) -> dict:
    device = pick_device(cfg, dist.local_rank)
    seed_everything(cfg.seed, 0)  # random initial weights: the same on every rank, as each keeps its own shard
    method = build_method(cfg, device)
    seed_everything(cfg.seed, dist.rank)
    shard_method(method, cfg, build_mesh(cfg.fsdp, dist))  # before the optimizers, which must hold the shards
    accumulation = config_schema.accumulation_steps(cfg, dist.world_size)
    is_causvid = cfg.method._target_.endswith("CausVid")
    dataset = instantiate(cfg.data.videos if is_causvid else cfg.data.prompts)
    batches = Batches(dataset, cfg.batch_size, dist.world_size, accumulation)
    g_opt, g_sched = build_optimizer(method.generator.parameters(), cfg.generator_optim, generator_updates(cfg, method.has_critic))
    c_opt, c_sched = build_optimizer(method.fake_score.parameters(), cfg.critic_optim, cfg.max_steps)
    ema = EMA(method.generator, cfg.ema_weight, cfg.ema_start_step) if cfg.ema_weight > 0 else None

    state = {"generator": method.generator, "critic": method.fake_score, "generator_optim": g_opt,
             "critic_optim": c_opt, "generator_sched": g_sched, "critic_sched": c_sched}
    if ema is not None:
        state["ema"] = ema
    meta = {"step": 0, "rng": get_rng_state(), "config": OmegaConf.to_yaml(cfg)}
    state["meta"] = meta
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
    start = 0
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        start = checkpoints.load(resume_from, state)
        set_rng_state(state["meta"]["rng"])
        log0("resumed from %s at step %d", resume_from, start)

    tracker = make_tracker(cfg.logger.mode, cfg.logger.project, cfg.logger.name or run_dir.name, run_dir,
                           OmegaConf.to_container(cfg, resolve=True), dist.rank)
    eval_frames = cfg.eval.num_frames or cfg.method.num_training_frames
    results: dict = {}

    def evaluate(step: int):
        if cfg.data.metrics is None:
            return
        # every rank samples (sharded forwards are collectives); rank 0 writes the metrics and videos
        with ema.applied_to(method.generator) if ema is not None and ema.active else contextlib.nullcontext():
            record = evaluate_toy(method, method.generator, cfg.data, step, cfg.seed, run_dir, eval_frames,
                                  video_formats=cfg.eval.video_formats, write=dist.is_main)
        results.setdefault("first", record)
        results["last"] = record
        tracker.log({k: v for k, v in record.items() if isinstance(v, float)}, step)
        log0("step %d: match rate %.3f, coverage %.3f (%d frames); %d frames: match rate %.3f",
             step, record["match_rate"], record["coverage"], eval_frames, record["long_num_frames"], record["long_match_rate"])

    def save(step: int):
        reshard(method.generator)  # an evaluation without EMA may have left it gathered; export its fp32 shards
        state["meta"].update(step=step, rng=get_rng_state())
        path = checkpoints.save(step, state, export=export_of(method, ema, cfg))
        log0("checkpoint: %s", path)

    if start == 0:
        warm_start(method, cfg, dist, batches, accumulation, step_update)
        if cfg.data.metrics is not None and dist.is_main:  # the exact teacher's own row, once per run
            ref = evaluate_toy(method, None, cfg.data, 0, cfg.seed, run_dir, eval_frames, teacher=True)
            log0("exact teacher (%s): match rate %.3f, coverage %.3f", ref["source"], ref["match_rate"], ref["coverage"])
        if cfg.eval.at_start:
            evaluate(0)
    bar = ProgressBar(cfg.max_steps, start)
    loop_start = time.perf_counter()  # the loop's wall time (periodic evaluations and checkpoints included)
    latest: dict[str, float] = {}  # the progress bar: the last value of each loss
    pending: dict[str, float] = {}  # the next log row: values of the updates since the last row only
    for step in range(start, cfg.max_steps):
        # 1. generator update every dfake_gen_update_ratio steps (self-rollout, DMD/SiD, EMA)
        if step % cfg.dfake_gen_update_ratio == 0 or not method.has_critic:
            pending.update(step_update(method, "generator", method.generator, g_opt, g_sched, batches, step, cfg, dist, accumulation))
            if ema is not None:
                ema.update(method.generator, step)
        # 2. critic update every step (denoising loss on fresh generator samples)
        if method.has_critic:
            pending.update(step_update(method, "critic", method.fake_score, c_opt, c_sched, batches, step, cfg, dist, accumulation))
        done = step + 1
        latest.update(pending)
        bar.update(done, {k: v for k, v in latest.items() if k.endswith("loss")})
        if done % cfg.logger.every == 0:
            tracker.log(pending, done)  # a generator that did not update since the last row is not repeated
            pending = {}
        if cfg.eval.every > 0 and done % cfg.eval.every == 0 and done != cfg.max_steps:
            evaluate(done)
        if cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0 and done != cfg.max_steps:
            save(done)
    bar.close()
    results["train_seconds"] = time.perf_counter() - loop_start
    if start < cfg.max_steps or resume_from is None:
        save(cfg.max_steps)
        evaluate(cfg.max_steps)
    tracker.finish()
    results["run_dir"] = str(run_dir)
    return results


def report(results: dict) -> None:
    log0("outputs in %s: checkpoints/, samples/, metrics.jsonl", results["run_dir"])
    if "first" in results and "last" in results:
        first, last = results["first"], results["last"]
        log0("match rate %.3f -> %.3f, coverage %.3f -> %.3f (step %d -> %d)", first["match_rate"],
             last["match_rate"], first["coverage"], last["coverage"], first["step"], last["step"])


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config_schema.validate(cfg)
    report(train(cfg, Path(HydraConfig.get().runtime.output_dir)))


if __name__ == "__main__":
    main()
