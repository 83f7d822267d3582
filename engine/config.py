"""The typed training config: dataclasses registered in Hydra's ConfigStore hold every default.

`configs/config.yaml` starts from the `train_schema` node, so Hydra rejects an unknown key or a
value of the wrong type at start, naming the key; `validate()` adds the cross-field checks.
Component nodes that are built with `hydra.utils.instantiate` (`_target_`) are typed `Any`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from difflib import get_close_matches
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.quantize import check_precision
from model.base import MethodConfig, SelfForcingModel
from model.wan.attention import BACKENDS


class Choice(str, Enum):
    """A key with a fixed set of values: Hydra refuses any other at compose time, naming the key.
    Members compare and hash as their strings (`cfg.model.dtype == "float32"`)."""

    __str__ = str.__str__
    __format__ = str.__format__


Dtype = Choice("Dtype", {v: v for v in ("float32", "bfloat16")})
AttentionBackend = Choice("AttentionBackend", {v: v for v in (*BACKENDS, "auto")})
CheckpointPolicy = Choice("CheckpointPolicy", {v: v for v in ("full", "save_attention")})
Schedule = Choice("Schedule", {v: v for v in ("constant", "cosine")})
LoggerMode = Choice("LoggerMode", {v: v for v in ("online", "offline", "disabled")})
Device = Choice("Device", {v: v for v in ("auto", "cpu", "cuda")})
VideoFormat = Choice("VideoFormat", {v: v for v in ("mp4", "gif")})
Precision = Choice("Precision", {v: v for v in ("bf16", "int8", "fp8")})


@dataclass
class CheckpointPolicySchema:
    # with gradient checkpointing, per trained network: full (recompute the whole block) | save_attention
    # (keep attention outputs, recompute the rest: fewer FLOPs, more memory, a dispatch mode per op);
    # a trained network not named here uses full
    generator: CheckpointPolicy = CheckpointPolicy.full
    critic: CheckpointPolicy = CheckpointPolicy.full


@dataclass
class LoraNetworkSchema:
    rank: int = 0  # adapter rank (peft LoRA; the base weights stay frozen); 0: full fine-tuning of every weight
    alpha: Optional[float] = None  # the adapters' scale is alpha / rank; null: alpha = rank (scale 1, as SimpleTuner's 128 / 128)
    # module names, matched as peft matches them (the name or its last components): self- and cross-attention
    # q, k, v, out; add ffn.net.0.proj and ffn.net.2 for the feed-forward
    targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0  # dropout on the adapters' input (peft lora_dropout)


@dataclass
class LoraSchema:
    # per trained Wan network (engine/lora.py); null or rank 0: full fine-tuning, as without this node
    generator: Optional[LoraNetworkSchema] = field(default_factory=LoraNetworkSchema)
    critic: Optional[LoraNetworkSchema] = field(default_factory=LoraNetworkSchema)
    export_merged: bool = False  # a LoRA generator's export: also the merged full weights (model.safetensors), not only the adapter


@dataclass
class PrecisionSchema:
    # frozen networks stored in lower precision (engine/quantize.py): null (as built: the Wan teacher in
    # model.dtype) | bf16 | int8 | fp8 (torchao weight-only linears; fp8 needs a GPU with compute capability 8.9+)
    teacher: Optional[Precision] = None
    text_encoder: Optional[Precision] = None
    generator: Optional[Precision] = None  # trained networks keep fp32 master weights: any value here is an error saying so
    critic: Optional[Precision] = None


@dataclass
class ModelSchema:
    path: Optional[str] = None  # a diffusers-format Wan folder (transformer/, vae/, text_encoder/, tokenizer/)
    backbone: dict = field(default_factory=dict)  # WanTransformer3DModel config; empty: path's transformer/config.json
    text_encoder: Any = None  # _target_ node
    vae: Any = None  # _target_ node
    teacher: Any = None  # _target_ node of the real score, or null to load a Wan teacher
    teacher_path: Optional[str] = None  # Wan teacher weights (diffusers folder / safetensors)
    generator_init: Optional[str] = None  # generator weights (export, .pt, folder); null = random
    critic_init: str = "teacher"  # teacher | generator | random | a weights file or folder: where the fake score starts
    latent_shape: list = field(default_factory=lambda: [16, 60, 104])  # (C, H, W) of a latent frame
    dtype: Dtype = Dtype.float32  # float32 | bfloat16 for the trained networks
    attention_backend: AttentionBackend = AttentionBackend.sdpa  # sdpa | cudnn | fa4 | flash_attn | auto (cudnn on CUDA in bf16 / fp16, else sdpa)
    gradient_checkpointing: bool = False  # activation checkpointing per transformer block
    checkpoint_policy: CheckpointPolicySchema = field(default_factory=lambda: CheckpointPolicySchema())
    fused_elementwise: Optional[bool] = False  # norms, modulation and RoPE through torch.compile (model/wan/fused.py); null: on CUDA
    compile_blocks: Optional[bool] = False  # the trained networks' chunk calls (the rollout) run each block as one compiled graph; null: on CUDA
    lora: LoraSchema = field(default_factory=LoraSchema)  # LoRA adapters instead of full fine-tuning, per network
    precision: PrecisionSchema = field(default_factory=PrecisionSchema)  # int8 / fp8 / bf16 storage of frozen networks
    # with FSDP: build the Wan networks on the meta device, shard, then each rank reads only its shards from the
    # files (false: every rank loads whole networks onto its device first, then shards them)
    sharded_loading: bool = True


@dataclass
class DataSchema:
    world: Any = None  # toy world (data=toy)
    prompts: Any = None  # dataset of prompt strings (self forcing)
    videos: Any = None  # dataset of {"prompts", "video" or "latents"} (CausVid)
    ode_pairs: Any = None  # dataset of {"prompts", "ode"}: the teacher's ODE trajectories (ODE regression)
    metrics: Any = None  # ground-truth evaluation settings (toy world)


@dataclass
class OptimSchema:
    lr: float = 2.0e-6  # AdamW learning rate
    betas: list = field(default_factory=lambda: [0.0, 0.999])  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    eps: float = 1.0e-8  # AdamW epsilon
    grad_clip: float = 10.0  # max gradient norm (<= 0: no clipping)
    warmup_steps: int = 0  # linear warm-up of the learning rate, in updates of this optimizer
    schedule: Schedule = Schedule.constant  # constant | cosine (to 0 at the last update)
    fused: Optional[bool] = None  # AdamW's fused kernel (one launch for all parameters); null: on CUDA, else foreach


@dataclass
class WarmStartSchema:
    generator_steps: int = 0  # ODE-regression updates of the generator on the teacher's trajectories, before step 0
    critic_steps: int = 0  # flow-matching updates of the fake score on the teacher's samples, before step 0
    optim: OptimSchema = field(default_factory=lambda: OptimSchema(lr=1.0e-3, betas=[0.9, 0.999], weight_decay=0.0))


@dataclass
class CheckpointSchema:
    every: int = 500  # steps between checkpoints (<= 0: only at the end)
    keep: int = 3  # newest complete checkpoints kept (<= 0: all)
    move_newer: bool = False  # move newer steps of another run in the run dir aside (checkpoints/abandoned_from_step_N/), not refuse


@dataclass
class EvalSchema:
    every: int = 500  # steps between evaluations / sample videos (<= 0: only at the end)
    num_frames: Optional[int] = None  # frames of evaluation samples (null: num_training_frames)
    at_start: bool = True  # also evaluate the untrained student at step 0
    video_formats: List[VideoFormat] = field(default_factory=lambda: [VideoFormat.mp4, VideoFormat.gif])  # sample grids written (mp4 needs imageio-ffmpeg)
    # validation videos of any model (engine/validation.py): samples/step_XXXXXX/ at every evaluation
    prompts: Optional[str] = None  # a text file, one prompt per line (null: no validation videos)
    seeds: List[int] = field(default_factory=lambda: [0])  # one video per prompt and seed, the same noise each time
    negative_prompt: Optional[str] = None  # the teacher's CFG negative prompt (null: method.negative_prompt)
    teacher: bool = True  # also the teacher's videos of the same prompts and seeds, once per run (samples/teacher/)
    teacher_steps: int = 50  # Euler steps of the teacher's ODE
    teacher_guidance_scale: Optional[float] = None  # teacher CFG uncond + g (cond - uncond); null: 1 + method.guidance_scale
    fps: int = 16  # frame rate of the validation mp4s (Wan's 16)


@dataclass
class ReshardSchema:
    generator: bool = True  # free the gathered weights after each forward (less memory, one more all-gather in backward)
    critic: bool = True
    teacher: bool = True  # false: the frozen teacher stays gathered after its first forward (a full replica)
    text_encoder: bool = True


@dataclass
class OffloadSchema:
    teacher: bool = False  # keep the frozen teacher's shards in pinned CPU memory (CUDA only)
    text_encoder: bool = False  # likewise for the text encoder


@dataclass
class FSDPSchema:
    replicate: int = 1  # copies of the weights, e.g. nodes: > 1 is hybrid sharding (shard in a node, replicate across)
    shard: Optional[int] = None  # ranks sharing one copy, e.g. GPUs per node (null: world size / replicate)
    reshard_after_forward: ReshardSchema = field(default_factory=ReshardSchema)
    cpu_offload: OffloadSchema = field(default_factory=OffloadSchema)


@dataclass
class LoggerSchema:
    mode: LoggerMode = LoggerMode.disabled  # online | offline | disabled (wandb)
    project: str = "selfforcing"  # wandb project
    name: Optional[str] = None  # wandb run name (null: the run directory's name)
    every: int = 10  # steps between logged losses


@dataclass
class RenamedOptimSchema:
    """generator_optim / critic_optim are now optim.generator / optim.critic: validate() names the new
    key for any value set here, instead of Hydra's bare 'not in struct'."""

    lr: Optional[float] = None
    betas: Optional[List[float]] = None
    weight_decay: Optional[float] = None
    eps: Optional[float] = None
    grad_clip: Optional[float] = None
    warmup_steps: Optional[int] = None
    schedule: Optional[str] = None
    fused: Optional[bool] = None


def _default_optim() -> dict:
    return {"generator": OptimSchema(), "critic": OptimSchema(lr=4.0e-7)}


@dataclass
class TrainSchema:
    seed: int = 0  # base seed; noise is reseeded from (seed, rank, step)
    max_steps: int = 1000  # training steps (each runs every phase whose period divides it)
    resume: Optional[str] = None  # null, "latest" (this run dir) or a run / step directory
    batch_size: int = 1  # micro-batch per GPU
    total_batch_size: Optional[int] = None  # batch_size x world size x accumulation (null: no accumulation)
    dfake_gen_update_ratio: int = 5  # one generator update every this many steps (methods with a critic)
    ema_weight: float = 0.99  # EMA decay of the networks the method averages, in [0, 1) (0: no EMA)
    ema_start_step: int = 200  # EMA starts (copies the network) at this step
    # one AdamW per trained network, by the network's name (model/contract.py); a network a method
    # adds takes OptimSchema's defaults unless given, e.g. +optim.head.lr=1e-4
    optim: Dict[str, Any] = field(default_factory=_default_optim)  # each entry checked as an OptimSchema
    generator_optim: RenamedOptimSchema = field(default_factory=RenamedOptimSchema)  # renamed: optim.generator
    critic_optim: RenamedOptimSchema = field(default_factory=RenamedOptimSchema)  # renamed: optim.critic
    warm_start: WarmStartSchema = field(default_factory=WarmStartSchema)  # for cheap teachers (toy world)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    fsdp: FSDPSchema = field(default_factory=FSDPSchema)  # sharding over ranks (utils/fsdp.py)
    # the method node: _target_ (the class) and its knobs, checked against the class's config_class
    # (model/base.py MethodConfig and its subclasses) by validate(), so a method's knobs live in its file
    method: Any = MISSING
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    device: Device = Device.auto  # auto (cuda if available) | cpu | cuda
    threads: Optional[int] = None  # torch's CPU threads per process (torch.set_num_threads); null: torch's default
    debug: bool = False  # expected errors (bad values, files) with their traceback, not one line


PROJECT = Path(__file__).resolve().parents[1]


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)
    # ${project:assets/toy/x.safetensors}: a file shipped with the project, found from any working directory
    OmegaConf.register_new_resolver("project", lambda rel: str(PROJECT / rel), replace=True)


register()



def unknown_keys(node: DictConfig, path: str = "") -> list[str]:
    """Keys that `+key=value` added to a typed node (Hydra's `+` bypasses the schema's struct check)."""
    bad = []
    kind = OmegaConf.get_type(node)
    known = {f.name for f in fields(kind)} if kind is not None and is_dataclass(kind) else None
    for key in node.keys():
        if known is not None and key not in known:
            close = get_close_matches(str(key), sorted(known), n=1)
            bad.append(f"{path}{key}" + (f" (did you mean {path}{close[0]}?)" if close else ""))
        elif known is not None:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
                bad += unknown_keys(child, f"{path}{key}.")
    return bad


def _check_values(cfg: DictConfig, method: MethodConfig) -> None:
    """Values out of range, named by key, before any network is built."""
    rules = [
        ("max_steps", cfg.max_steps >= 0, ">= 0"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("total_batch_size", cfg.total_batch_size is None or cfg.total_batch_size >= 1, ">= 1 or null"),
        ("dfake_gen_update_ratio", cfg.dfake_gen_update_ratio >= 1, ">= 1"),
        ("ema_weight", 0.0 <= cfg.ema_weight < 1.0, "in [0, 1) (0: no EMA)"),
        ("ema_start_step", cfg.ema_start_step >= 0, ">= 0"),
        ("logger.every", cfg.logger.every >= 1, ">= 1"),
        ("threads", cfg.threads is None or cfg.threads >= 1, ">= 1 or null"),
        ("warm_start.generator_steps", cfg.warm_start.generator_steps >= 0, ">= 0"),
        ("warm_start.critic_steps", cfg.warm_start.critic_steps >= 0, ">= 0"),
        ("eval.seeds", len(cfg.eval.seeds) >= 1 and len(set(cfg.eval.seeds)) == len(cfg.eval.seeds),
         "a non-empty list of distinct ints"),
        ("eval.teacher_steps", cfg.eval.teacher_steps >= 1, ">= 1"),
        ("eval.fps", cfg.eval.fps >= 1, ">= 1"),
    ]
    for name in list(cfg.optim.keys()):
        optim = optim_config(cfg, name)
        rules += [
            (f"optim.{name}.lr", optim.lr >= 0, ">= 0"),
            (f"optim.{name}.weight_decay", optim.weight_decay >= 0, ">= 0"),
            (f"optim.{name}.eps", optim.eps > 0, "> 0"),
            (f"optim.{name}.betas", len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "two numbers in [0, 1)"),
            (f"optim.{name}.warmup_steps", optim.warmup_steps >= 0, ">= 0"),
        ]
    for name, lora in cfg.model.lora.items():
        if name != "export_merged" and lora is not None:
            rules += [
                (f"model.lora.{name}.rank", lora.rank >= 0, ">= 0 (0: full fine-tuning)"),
                (f"model.lora.{name}.alpha", lora.alpha is None or lora.alpha > 0, "> 0 or null (= rank)"),
                (f"model.lora.{name}.dropout", 0.0 <= lora.dropout < 1.0, "in [0, 1)"),
                (f"model.lora.{name}.targets", len(lora.targets) >= 1, "a non-empty list of module names"),
            ]
    for key, ok, expected in rules:
        if not ok:
            raise ValueError(f"{key} must be {expected}, got {OmegaConf.select(cfg, key)}")
    frames = {"method.num_training_frames": method.num_training_frames, "method.min_num_frames": method.min_num_frames,
              "method.max_num_frames": method.max_num_frames, "eval.num_frames": cfg.eval.num_frames}
    for key, n in frames.items():
        if n is not None:
            try:
                method.pattern.check_clip(n)
            except ValueError as e:
                raise ValueError(f"{key}={n}: {e}") from None


def validate(cfg: DictConfig) -> None:
    """Cross-field checks, with messages that say which key to fix and how (before anything is built)."""
    cls = method_class(cfg)
    # per-network keys may name any network the method declares (+fsdp.reshard_after_forward.head=false)
    per_network = ("fsdp.reshard_after_forward.", "fsdp.cpu_offload.", "model.checkpoint_policy.")
    unknown = [k for k in unknown_keys(cfg)
               if not (k.startswith(per_network) and k.rsplit(".", 1)[-1].split(" ")[0] in cls.networks)]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]}: not in the training schema (engine/config.py TrainSchema; "
                         "configs/config.yaml lists every key)")
    method = method_config(cfg)  # the method's knobs against its own config class; runs its __post_init__
    for old in ("generator_optim", "critic_optim"):
        set_keys = [k for k, v in cfg[old].items() if v is not None]
        if set_keys:
            new = "optim." + old.removesuffix("_optim")
            raise ValueError(f"{old}.{set_keys[0]} was renamed: use {new}.{set_keys[0]} ({old}.* is now {new}.*)")
    trained = [name for name, net in cls.networks.items() if net.trained]
    for name, optim in cfg.optim.items():
        if name not in trained and name not in _default_optim():  # the defaults' groups may go unused (no critic)
            raise ValueError(f"optim.{name}: {cls.__name__} trains no network {name!r}; its trained networks are {trained}")
        optim_config(cfg, name)  # its keys and types
    for name, lora in cfg.model.lora.items():
        if name != "export_merged" and lora is not None and lora.rank > 0 and name not in trained:
            raise ValueError(f"model.lora.{name}.rank={lora.rank}: {cls.__name__} trains no network {name!r}; "
                             f"its trained networks are {trained}")
    for name, precision in cfg.model.precision.items():  # int8 for a trained network: named here, before any build
        if precision is not None and name not in cls.networks:
            raise ValueError(f"model.precision.{name}={precision}: {cls.__name__} declares no network {name!r}")
        check_precision(name, None if precision is None else str(precision), name in trained)
    for phase in cls.phases:
        phase.period(cfg)  # a str period names a config key: it must exist and be >= 1
        for source in phase.data:
            if not any(cfg.data.get(s) is not None for s in source.split("|")):
                wanted = " or ".join(f"data.{s}" for s in source.split("|"))
                raise ValueError(f"{cls.__name__}'s {phase.name} phase draws {wanted}, which this run's data config "
                                 "does not set; pick a data group that provides it (data=toy, prompts, latents, ode_pairs)")
    if cfg.fsdp.replicate < 1 or (cfg.fsdp.shard is not None and cfg.fsdp.shard < 1):
        raise ValueError(f"fsdp.replicate and fsdp.shard must be >= 1 (shard may be null), got {cfg.fsdp.replicate}, {cfg.fsdp.shard}")
    from engine.build import check_weight_folders

    check_weight_folders(cfg.model)  # before the checks below, so a missing Wan file is named with the layout
    if cfg.model.critic_init not in ("teacher", "generator", "random") and not Path(cfg.model.critic_init).exists():
        raise ValueError(
            f"model.critic_init must be teacher, generator, random or a weights file / folder, got {cfg.model.critic_init!r}"
            + relative_hint(cfg.model.critic_init)
        )
    if cfg.model.generator_init is not None and not Path(cfg.model.generator_init).exists():
        raise FileNotFoundError(f"model.generator_init={cfg.model.generator_init!r} does not exist"
                                + relative_hint(cfg.model.generator_init))
    _check_values(cfg, method)
    if cfg.eval.prompts is not None:
        from engine.validation import read_eval_prompts

        read_eval_prompts(cfg.eval.prompts)  # a missing or empty file is named now, not at the first evaluation
    if len(cfg.model.latent_shape) != 3:
        raise ValueError(f"model.latent_shape must be [C, H, W], got {list(cfg.model.latent_shape)}")


def optim_config(cfg: DictConfig, name: str) -> DictConfig:
    """optim.<name> as a typed OptimSchema node: its keys over OptimSchema's defaults (a network a method
    adds may have no entry: all defaults). A wrong key or type names optim.<name>.<key>."""
    try:
        return OmegaConf.merge(OmegaConf.structured(OptimSchema), cfg.optim.get(name) or {})
    except OmegaConfBaseException as e:
        raise ValueError(f"optim.{name}.{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None


def relative_hint(path: str) -> str:
    """For an error about a relative path: where it was looked for."""
    return "" if Path(path).is_absolute() else f" (a relative path: looked for in the working directory {Path.cwd()})"


def method_class(cfg: DictConfig) -> type[SelfForcingModel]:
    """The class method._target_ names: a method (model.base.SelfForcingModel and its contract)."""
    target = cfg.method.get("_target_") if isinstance(cfg.method, DictConfig) else None
    if not target:
        raise ValueError("method._target_ is not set: pick a method group (method=dmd, sid, causvid, ode_regression)")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, SelfForcingModel)):
        raise TypeError(f"method._target_={target} is not a method class (a subclass of model.base.SelfForcingModel)")
    return cls


def method_config(cfg: DictConfig, rollout_only: bool = False) -> MethodConfig:
    """The method's config dataclass (its `config_class`) from the method node: the one place it is built.

    Every knob is checked against that class, so an unknown key or a wrong type names the key and the
    class. rollout_only: the rollout's knobs only (MethodConfig's), for inference from an export whose
    method node may hold knobs of its training loss."""
    node = OmegaConf.to_container(cfg.method, resolve=True)
    if rollout_only:
        known = {f.name for f in fields(MethodConfig)}
        return MethodConfig(**{k: v for k, v in node.items() if k in known})
    cls = method_class(cfg)
    config_cls = cls.config_class
    node.pop("_target_")
    try:
        OmegaConf.merge(OmegaConf.structured(config_cls), node)  # types and names, with the key in the message
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        known = [f.name for f in fields(config_cls)]
        raise ValueError(f"method.{key}: {str(e).splitlines()[0]} ({cls.__name__} takes {known})") from None
    return config_cls(**node)  # the values as written (an int stays an int), defaults for the rest


def accumulation_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per update so that total_batch_size = batch_size x world size x accumulation."""
    if cfg.total_batch_size is None:
        return 1
    per_step = cfg.batch_size * world_size
    if cfg.total_batch_size % per_step:
        raise ValueError(
            f"total_batch_size={cfg.total_batch_size} is not a multiple of batch_size x world size = "
            f"{cfg.batch_size} x {world_size}; change total_batch_size or batch_size"
        )
    return cfg.total_batch_size // per_step


CONFIGS = PROJECT / "configs"


def compose_checked(overrides: list[str]) -> DictConfig:
    """The training config outside train.py (scripts): configs/config.yaml with Hydra overrides, validated,
    so a bad key or a missing Wan file is named before anything loads."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg)
    return cfg


__all__ = ["TrainSchema", "validate", "method_class", "method_config", "optim_config", "accumulation_steps", "compose_checked", "MISSING"]

