"""The training loop, for any method: it runs what the method declares (model/contract.py).

From the method's `networks` and `phases` the Trainer builds one AdamW and LR schedule per trained
network (`optim.<network>`), an EMA for each network declared with one, FSDP2 sharding, the data
each phase draws, and the checkpoint registry (`<network>`, `<network>_optim`, `<network>_sched`,
`ema` for the generator's EMA, `ema_<network>` for others, `<network>` for state networks, `meta`).
A step runs every phase whose period divides it, in declaration order; a phase is one optimizer
update over its accumulated micro-batches: (prepass,) draw, reseed, loss, backward, all-reduce the
logs, clip, step, EMA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from engine.build import backbone_config, build_method, build_optimizer
from engine.config import accumulation_steps, optim_config
from engine.evaluation import evaluate_toy
from engine.lora import adapter_config, adapter_weights, lora_spec, merged_weights
from engine.validation import ValidationVideos
from engine.warm_start import warm_start
from model.contract import Phase
from utils.checkpoint import CheckpointManager, config_changes, read_per_rank
from utils.data import Batches
from utils.distributed import Dist, all_reduce_mean, destroy, init_distributed, log0, pick_device, single_process_group
from utils.ema import EMA
from utils.fsdp import build_mesh, reshard
from utils.rng import get_rng_state, seed_everything, set_rng_state
from utils.tracker import ProgressBar, make_tracker


@dataclass
class Optimized:
    """A trained network with its optimizer, LR schedule and optimizer config."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: DictConfig

    @property
    def params(self) -> list[torch.Tensor]:
        # The optimiser's parameters, not net.parameters(): a network kept gathered between forwards
        # (reshard_after_forward=false) lists its gathered bf16 copies there, which hold no gradients.
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]


def updates_of(cfg: DictConfig, phases: tuple[Phase, ...], network: str, method=None) -> int:
    """Optimizer updates of `network` in a run: one per step of every phase that updates it (with `method`, only
    the steps its phases' `when` allows; without, a phase with a `when` counts every step of its period)."""
    total = 0
    for p in phases:
        if network in p.updates:
            period = p.period(cfg)
            if p.when is None or method is None:
                total += math.ceil(cfg.max_steps / period)
            else:
                total += sum(p.runs_at(method, s, period) for s in range(0, cfg.max_steps, period))
    return total


@torch.no_grad()
def allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Every parameter's optimizer state now, as it is before its first update (AdamW: step 0, zero moments):
    its own step with zero gradients and learning rate 0, the step counts set back to 0. A checkpoint then holds
    the state of every trained parameter, also of one no update has reached yet (DCM's detail expert in its
    semantic stage), so a resumed run's fresh optimizer loads the same entries the saving run wrote."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if optimizer.state or not params:
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0


class DataSources:
    """One deterministic Batches per data source (a key of the data config), built once."""

    def __init__(self, data_cfg: DictConfig, batch_size: int, world_size: int, accumulation: int):
        self.data_cfg, self.args = data_cfg, (batch_size, world_size, accumulation)
        self.batches: dict[str, Batches] = {}

    def resolve(self, source: str) -> str:
        """"a|b": the first of a, b that the data config sets."""
        for name in source.split("|"):
            if self.data_cfg.get(name) is not None:
                return name
        raise ValueError(f"no data.{source.replace('|', ' or data.')} in this run's data config")

    def prepare(self, sources: tuple[str, ...]) -> None:
        for source in sources:
            name = self.resolve(source)
            if name not in self.batches:
                self.batches[name] = Batches(instantiate(self.data_cfg[name]), *self.args)

    def get(self, sources: tuple[str, ...], step: int, micro: int, rank: int) -> tuple[list[int], dict]:
        """The batch of a phase: the first source's items; further sources add their tensors (their
        prompts as `<source>_prompts`)."""
        merged: dict = {}
        first_ids: list[int] = []
        for i, source in enumerate(sources):
            self.prepare((source,))
            name = self.resolve(source)
            ids, batch = self.batches[name].get(step, micro, rank)
            if i == 0:
                first_ids, merged = ids, batch
            else:
                merged.update({(f"{name}_prompts" if k == "prompts" else k): v for k, v in batch.items()})
        return first_ids, merged


@torch.no_grad()
def prepass(method, phase: Phase, data: DataSources, step: int, seed: int, dist: Dist, accumulation: int) -> dict:
    """The phase's prepass (model/contract.py) over every micro-batch, summed over micro-batches and ranks."""
    totals: dict[str, torch.Tensor] = {}
    for micro in range(accumulation):
        ids, batch = data.get(phase.data, step, micro, dist.rank)
        method.reseed(seed, step, phase.name, ids)  # the draws the loss will make
        for k, v in getattr(method, phase.prepass)(batch).items():
            totals[k] = totals.get(k, 0) + v.double()
    names = sorted(totals)
    if not names:
        return {}
    summed = all_reduce_mean(torch.stack([totals[k] for k in names]).to(dist.device)) * dist.world_size
    return dict(zip(names, summed))


def run_phase(method, phase: Phase, optimized: dict[str, Optimized], data: DataSources, step: int, seed: int,
              dist: Dist, accumulation: int) -> dict[str, float]:
    """One update of the phase's networks over the accumulated micro-batches; returns the logged numbers."""
    updated = {name: optimized[name] for name in phase.updates}
    for name, o in updated.items():
        if dist.world_size > 1 and not isinstance(o.params[0], DTensor):
            raise RuntimeError(f"the {name} is not sharded: on several ranks, shard it with engine.build.shard_method first")
        o.optimizer.zero_grad(set_to_none=True)
    loss_fn = getattr(method, phase.loss)
    totals = prepass(method, phase, data, step, seed, dist, accumulation) if phase.prepass and accumulation > 1 else None
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accumulation):
        ids, batch = data.get(phase.data, step, micro, dist.rank)
        method.reseed(seed, step, phase.name, ids)
        if totals is not None:
            batch["totals"] = totals
        loss, parts = loss_fn(batch)
        # FSDP averages over ranks the gradients of each sharded network the backward runs through;
        # backward(inputs=...) would skip that, so SiD's critic gets gradients too, dropped below.
        (loss / accumulation).backward()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=dist.device).detach() / accumulation
    for name, o in optimized.items():
        if name not in updated:
            o.net.zero_grad(set_to_none=True)
    # one all-reduce of the logged numbers: every rank sees the global batch's losses, and stops together on NaN
    names = sorted(sums)
    logs: dict[str, float] = dict(zip(names, all_reduce_mean(torch.stack([sums[k] for k in names])).tolist()))
    key = f"{phase.name}_loss"
    if key not in logs:
        raise KeyError(f"{type(method).__name__}.{phase.loss} must log {key!r} (it logged {names})")
    if not math.isfinite(logs[key]):
        raise FloatingPointError(
            f"{key} is {logs[key]} at step {step}: training stopped before the update, so no NaN weights were "
            "saved; resume from the last checkpoint with a lower learning rate or check the inputs"
        )
    for name, o in updated.items():
        if o.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(o.params, o.cfg.grad_clip)  # the whole model's norm, also from shards
            logs[f"{name}_grad_norm"] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        o.optimizer.step()
        o.scheduler.step()
    # Networks kept gathered within a step (fsdp.reshard_after_forward=false) are freed between steps:
    # the next forward gathers the updated shards, and the EMA and checkpoints see the fp32 shards.
    for o in optimized.values():
        reshard(o.net)
    return logs


class Trainer:
    """Everything a run holds, built from the config and the method's declaration."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dist: Dist):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        device = pick_device(cfg, dist.local_rank)
        seed_everything(cfg.seed, 0)  # random initial weights: the same on every rank, as each keeps its own shard
        # sharded (and with model.sharded_loading read shard by shard) before the optimizers, which must hold the shards
        self.method = method = build_method(cfg, device, build_mesh(cfg.fsdp, dist))
        seed_everything(cfg.seed, dist.rank)
        self.accumulation = accumulation_steps(cfg, dist.world_size)
        self.data = DataSources(cfg.data, cfg.batch_size, dist.world_size, self.accumulation)
        self.phases = type(method).phases
        for phase in self.phases:  # every phase's data set now, so a bad one fails before step 0
            self.data.prepare(phase.data)
        self.periods = {p.name: p.period(cfg) for p in self.phases}
        networks = type(method).networks
        self.optimized: dict[str, Optimized] = {}
        for name, spec in networks.items():
            if spec.trained:
                net = getattr(method, spec.attr)
                opt_cfg = optim_config(cfg, name)
                optimizer, scheduler = build_optimizer(net.parameters(), opt_cfg, updates_of(cfg, self.phases, name, method))
                allocate_state(optimizer)
                self.optimized[name] = Optimized(net, optimizer, scheduler, opt_cfg)
        self.emas: dict[str, EMA] = {}
        if cfg.ema_weight > 0:
            for name, spec in networks.items():
                if spec.ema:
                    self.emas[name] = EMA(getattr(method, spec.attr), cfg.ema_weight, cfg.ema_start_step)
        self.state: dict = {name: o.net for name, o in self.optimized.items()}
        self.state.update({name: getattr(method, spec.attr) for name, spec in networks.items() if spec.state})
        for name, o in self.optimized.items():
            self.state[f"{name}_optim"] = o.optimizer
            self.state[f"{name}_sched"] = o.scheduler
        for name, ema in self.emas.items():
            self.state["ema" if name == "generator" else f"ema_{name}"] = ema
        self.state["meta"] = {"step": 0, "rng": get_rng_state(), "config": OmegaConf.to_yaml(cfg)}
        self.checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
        self.tracker = make_tracker(cfg.logger.mode, cfg.logger.project, cfg.logger.name or run_dir.name, run_dir,
                                    OmegaConf.to_container(cfg, resolve=True), dist.rank)
        self.eval_frames = cfg.eval.num_frames or cfg.method.num_training_frames
        self.validation = None  # eval.prompts: videos of any model, beside (or instead of) the toy metrics
        if cfg.eval.prompts is not None:
            self.validation = ValidationVideos(cfg, run_dir, self.eval_frames, write=dist.is_main)
            self.validation.check_prompts(method.text_encoder)
        self.teacher_videos = cfg.eval.teacher and self.validation is not None  # made at the first evaluation
        self.results: dict = {}

    @property
    def generator_ema(self) -> EMA | None:
        ema = self.emas.get("generator")
        return ema if ema is not None and ema.active else None

    def resume(self) -> int:
        """Load the checkpoint cfg.resume names, if any; the step to start from.

        Refused on every rank, before training: a damaged checkpoint, a model it does not fit, and
        newer steps of another run in this run directory (unless checkpoint.move_newer moves them
        aside). Config keys that differ from the checkpoint's are a warning, except those that may
        change when a run continues: how long, where and on what it runs, what it logs and keeps.
        """
        cfg = self.cfg
        resume_from = self.checkpoints.prepare_resume(cfg.resume, move_newer=cfg.checkpoint.move_newer)
        self.resumed = resume_from is not None
        if resume_from is None:
            return 0
        current = OmegaConf.to_yaml(cfg)
        saved = read_per_rank(resume_from).get("meta", {}).get("config") if self.dist.is_main else None
        if saved:
            may_change = ("resume", "max_steps", "checkpoint", "eval", "logger", "threads", "debug", "device", "fsdp")
            changed = config_changes(saved, current, ignore=may_change)
            if changed:
                log0("resuming from %s with %d config keys changed: %s", resume_from, len(changed), "; ".join(changed),
                     level=logging.WARNING)
        start = self.checkpoints.load(resume_from, self.state)
        set_rng_state(self.state["meta"]["rng"])
        self.state["meta"]["config"] = current  # the next checkpoints hold the config they were trained with
        log0("resumed from %s at step %d", resume_from, start)
        return start

    def evaluate(self, step: int) -> None:
        """Of the (EMA) generator: toy-world metrics and a sample grid where there is ground truth; the
        validation videos of eval.prompts (and, at the first evaluation, the teacher's) for any model."""
        cfg, method = self.cfg, self.method
        if self.teacher_videos:
            self.teacher_videos = False
            self.validation.teacher(method, step, self.tracker)
        if cfg.data.metrics is None and self.validation is None:
            return
        ema = self.generator_ema
        record = None
        # every rank samples (sharded forwards are collectives); rank 0 writes the metrics and videos
        with ema.applied_to(method.generator) if ema is not None else contextlib.nullcontext():
            if self.validation is not None:
                weights = "ema" if ema is not None else "generator"
                self.validation.student(method, method.generator, step, weights, self.tracker)
            if cfg.data.metrics is not None:
                record = evaluate_toy(method, method.generator, cfg.data, step, cfg.seed, self.run_dir,
                                      self.eval_frames, video_formats=cfg.eval.video_formats, write=self.dist.is_main)
        if record is None:
            return
        self.results.setdefault("first", record)
        self.results["last"] = record
        self.tracker.log({k: v for k, v in record.items() if isinstance(v, float)}, step)
        log0("step %d: match rate %.3f, coverage %.3f (%d frames); %d frames: match rate %.3f", step,
             record["match_rate"], record["coverage"], self.eval_frames, record["long_num_frames"], record["long_match_rate"])

    def export(self) -> dict:
        """The inference weights, consolidated on rank 0 (a collective): EMA once it has started, else the generator.
        A LoRA generator's are its adapters (peft's names) and, with model.lora.export_merged, the merged weights."""
        cfg, ema, generator = self.cfg, self.generator_ema, self.method.generator
        lora = lora_spec(cfg, "generator")
        if ema is not None:
            weights = ema.full_state_dict(rank0_only=True)  # a LoRA generator's EMA holds its adapters only
        else:  # rank 0 gets them, on the CPU; of a LoRA generator the adapters only (the base is frozen)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora is not None)
            weights = get_model_state_dict(generator, options=options)
        lora_parts = self.method.export_parts(weights)  # a method's own parts (DCM's detail LoRA); {} by default
        weights = weights | lora_parts.pop("weights", {})
        if lora is not None:
            lora_parts = {"adapter": adapter_weights(generator, weights), "adapter_config": adapter_config(lora)}
            trained, weights = weights, {}
            if cfg.model.lora.export_merged:
                base = get_model_state_dict(generator, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if base:  # rank 0
                    weights = merged_weights(backbone_config(cfg), lora, base | trained)
        config = {
            "backbone": backbone_config(cfg),
            "method": OmegaConf.to_container(cfg.method, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=False),
            "data": OmegaConf.to_container(cfg.data, resolve=False),
            "weights": "ema" if ema is not None else "generator",
        }
        return {"weights": weights, "config": config, **lora_parts}

    def save(self, step: int) -> None:
        reshard(self.method.generator)  # an evaluation without EMA may have left it gathered; export its fp32 shards
        self.state["meta"].update(step=step, rng=get_rng_state())
        path = self.checkpoints.save(step, self.state, export=self.export())
        log0("checkpoint: %s", path)

    def step(self, step: int) -> dict[str, float]:
        """Every phase due at this step, in declaration order; each network's EMA after its update."""
        logs: dict[str, float] = {}
        for phase in self.phases:
            if phase.runs_at(self.method, step, self.periods[phase.name]):
                logs.update(run_phase(self.method, phase, self.optimized, self.data, step, self.cfg.seed, self.dist,
                                      self.accumulation))
                for name in phase.updates:
                    if name in self.emas:
                        self.emas[name].update(self.optimized[name].net, step)
        return logs

    def run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        start = self.resume()
        if start == 0:
            warm_start(self.method, cfg, dist, self.data, self.accumulation, run_phase)
            if cfg.data.metrics is not None and dist.is_main:  # the exact teacher's own row, once per run
                ref = evaluate_toy(self.method, None, cfg.data, 0, cfg.seed, self.run_dir, self.eval_frames, teacher=True)
                log0("exact teacher (%s): match rate %.3f, coverage %.3f", ref["source"], ref["match_rate"], ref["coverage"])
            if cfg.eval.at_start:
                self.evaluate(0)
        bar = ProgressBar(cfg.max_steps, start)
        loop_start = time.perf_counter()  # the loop's wall time (periodic evaluations and checkpoints included)
        latest: dict[str, float] = {}  # the progress bar: the last value of each loss
        pending: dict[str, float] = {}  # the next log row: values of the updates since the last row only
        for step in range(start, cfg.max_steps):
            pending.update(self.step(step))
            done = step + 1
            latest.update(pending)
            bar.update(done, {k: v for k, v in latest.items() if k.endswith("loss")})
            if done % cfg.logger.every == 0:
                self.tracker.log(pending, done)  # a network that did not update since the last row is not repeated
                pending = {}
            if cfg.eval.every > 0 and done % cfg.eval.every == 0 and done != cfg.max_steps:
                self.evaluate(done)
            if cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0 and done != cfg.max_steps:
                self.save(done)
        bar.close()
        self.results["train_seconds"] = time.perf_counter() - loop_start
        if start < cfg.max_steps or not self.resumed:
            self.save(cfg.max_steps)
            self.evaluate(cfg.max_steps)
        self.tracker.finish()
        self.results["run_dir"] = str(self.run_dir)
        return self.results


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train on every rank of a torchrun job, or as world size 1 of the same code (a one-rank group)."""
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads must be >= 1 or null (torch's default), got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    dist = init_distributed()
    own_group = single_process_group(dist)
    try:
        return Trainer(cfg, Path(run_dir), dist).run()
    finally:
        if own_group:
            destroy()
