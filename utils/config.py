"""The typed training config: dataclasses registered in Hydra's ConfigStore hold every default.

`configs/config.yaml` starts from the `train_schema` node, so Hydra rejects an unknown key or a
value of the wrong type at start, naming the key; `validate()` adds the cross-field checks.
Component nodes that are built with `hydra.utils.instantiate` (`_target_`) are typed `Any`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from model.base import MethodConfig


@dataclass
class MethodSchema(MethodConfig):
    """All method knobs (see model/base.py); a method rejects knobs of other methods."""

    _target_: str = "model.dmd.DMD"  # the method class
    sid_alpha: float = 1.0  # SiD only
    teacher_forcing: bool = False  # CausVid only: clean (true) or noisy (false) context

    def __post_init__(self):  # checked in validate(), after all overrides are merged
        pass


@dataclass
class CheckpointPolicySchema:
    # with gradient checkpointing, per trained network: full (recompute the whole block) | save_attention
    # (keep attention outputs, recompute the rest: fewer FLOPs, more memory, a dispatch mode per op)
    generator: str = "full"
    critic: str = "full"


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
    dtype: str = "float32"  # float32 | bfloat16 for the trained networks
    attention_backend: str = "sdpa"  # sdpa | cudnn | fa4 | flash_attn | auto (cudnn on CUDA in bf16 / fp16, else sdpa)
    gradient_checkpointing: bool = False  # activation checkpointing per transformer block
    checkpoint_policy: CheckpointPolicySchema = field(default_factory=lambda: CheckpointPolicySchema())
    fused_elementwise: Optional[bool] = False  # norms, modulation and RoPE through torch.compile (model/wan/fused.py); null: on CUDA
    compile_blocks: Optional[bool] = False  # the trained networks' chunk calls (the rollout) run each block as one compiled graph; null: on CUDA


@dataclass
class DataSchema:
    world: Any = None  # toy world (data=toy)
    prompts: Any = None  # dataset of prompt strings (self forcing)
    videos: Any = None  # dataset of {"prompts", "video"} (CausVid)
    metrics: Any = None  # ground-truth evaluation settings (toy world)
    num_workers: int = 0  # DataLoader workers


@dataclass
class OptimSchema:
    lr: float = 2.0e-6  # AdamW learning rate
    betas: list = field(default_factory=lambda: [0.0, 0.999])  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    eps: float = 1.0e-8  # AdamW epsilon
    grad_clip: float = 10.0  # max gradient norm (<= 0: no clipping)
    warmup_steps: int = 0  # linear warm-up of the learning rate, in updates of this optimizer
    schedule: str = "constant"  # constant | cosine (to 0 at max_steps)
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


@dataclass
class EvalSchema:
    every: int = 500  # steps between evaluations / sample videos (<= 0: only at the end)
    num_frames: Optional[int] = None  # frames of evaluation samples (null: num_training_frames)
    at_start: bool = True  # also evaluate the untrained student at step 0
    video_formats: List[str] = field(default_factory=lambda: ["mp4", "gif"])  # sample grids written (mp4 needs imageio-ffmpeg)


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
    mode: str = "disabled"  # online | offline | disabled (wandb)
    project: str = "selfforcing"  # wandb project
    name: Optional[str] = None  # wandb run name (null: the run directory's name)
    every: int = 10  # steps between logged losses


@dataclass
class TrainSchema:
    seed: int = 0  # base seed; noise is reseeded from (seed, rank, step)
    max_steps: int = 1000  # training steps (each has a critic update)
    resume: Optional[str] = None  # null, "latest" (this run dir) or a run / step directory
    batch_size: int = 1  # micro-batch per GPU
    total_batch_size: Optional[int] = None  # batch_size x world size x accumulation (null: no accumulation)
    dfake_gen_update_ratio: int = 5  # one generator update every this many steps
    ema_weight: float = 0.99  # EMA decay of the generator (<= 0: no EMA)
    ema_start_step: int = 200  # EMA starts (copies the generator) at this step
    generator_optim: OptimSchema = field(default_factory=OptimSchema)
    critic_optim: OptimSchema = field(default_factory=lambda: OptimSchema(lr=4.0e-7))
    warm_start: WarmStartSchema = field(default_factory=WarmStartSchema)  # for cheap teachers (toy world)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    fsdp: FSDPSchema = field(default_factory=FSDPSchema)  # sharding over ranks (utils/fsdp.py)
    method: MethodSchema = field(default_factory=MethodSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    experiment_name: str = "default"  # set by experiment presets, for logs
    device: str = "auto"  # auto (cuda if available) | cpu | cuda


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register()

CHECKPOINT_POLICIES = ("full", "save_attention")
_METHOD_ONLY = {"sid_alpha": "model.sid.SiD", "teacher_forcing": "model.causvid.CausVid"}


def validate(cfg: DictConfig) -> None:
    """Cross-field checks, with messages that say which key to fix and how."""
    method = method_config(cfg)  # runs MethodConfig.__post_init__
    defaults = MethodSchema()
    for key, owner in _METHOD_ONLY.items():
        if cfg.method[key] != getattr(defaults, key) and cfg.method._target_ != owner:
            raise ValueError(f"method.{key} is a knob of {owner}, but method._target_ is {cfg.method._target_}")
    for name in ("generator_optim", "critic_optim"):
        optim = cfg[name]
        if optim.schedule not in ("constant", "cosine"):
            raise ValueError(f"{name}.schedule must be constant or cosine, got {optim.schedule!r}")
        if len(optim.betas) != 2:
            raise ValueError(f"{name}.betas must hold two numbers, got {list(optim.betas)}")
    bad = [f for f in cfg.eval.video_formats if f not in ("mp4", "gif")]
    if bad:
        raise ValueError(f"eval.video_formats may hold mp4 and gif, got {bad}")
    if cfg.logger.mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    from model.wan.attention import BACKENDS

    if cfg.model.attention_backend not in (*BACKENDS, "auto"):
        raise ValueError(f"model.attention_backend must be one of {(*BACKENDS, 'auto')}, got {cfg.model.attention_backend!r}")
    for net, policy in cfg.model.checkpoint_policy.items():
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"model.checkpoint_policy.{net} must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    if cfg.fsdp.replicate < 1 or (cfg.fsdp.shard is not None and cfg.fsdp.shard < 1):
        raise ValueError(f"fsdp.replicate and fsdp.shard must be >= 1 (shard may be null), got {cfg.fsdp.replicate}, {cfg.fsdp.shard}")
    from utils.build import check_weight_folders

    check_weight_folders(cfg.model)  # before the checks below, so a missing Wan file is named with the layout
    if cfg.model.critic_init not in ("teacher", "generator", "random") and not Path(cfg.model.critic_init).exists():
        raise ValueError(
            f"model.critic_init must be teacher, generator, random or a weights file / folder, got {cfg.model.critic_init!r}"
        )
    if cfg.model.generator_init is not None and not Path(cfg.model.generator_init).exists():
        raise FileNotFoundError(f"model.generator_init={cfg.model.generator_init!r} does not exist")
    if cfg.dfake_gen_update_ratio < 1 or cfg.batch_size < 1 or cfg.max_steps < 0:
        raise ValueError("dfake_gen_update_ratio and batch_size must be >= 1, max_steps >= 0")
    if len(cfg.model.latent_shape) != 3:
        raise ValueError(f"model.latent_shape must be [C, H, W], got {list(cfg.model.latent_shape)}")
    del method


def method_config(cfg: DictConfig) -> MethodConfig:
    """The method's own config dataclass from the method node."""
    from hydra.utils import get_class

    cls = get_class(cfg.method._target_)
    config_cls = getattr(cls, "config_class", MethodConfig)
    node = OmegaConf.to_container(cfg.method, resolve=True)
    return config_cls(**{f.name: node[f.name] for f in fields(config_cls)})


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


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_checked(overrides: list[str]) -> DictConfig:
    """The training config outside train.py (scripts): configs/config.yaml with Hydra overrides, validated,
    so a bad key or a missing Wan file is named before anything loads."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg)
    return cfg


__all__ = ["TrainSchema", "validate", "method_config", "accumulation_steps", "compose_checked", "MISSING"]

