"""Build a training run's parts from the config: networks, the method, optimizers, data batches.

Plain code, in the order torchtitan uses: build the networks, set their precision and training
mode, hand them to the method; optimizers last (so a later sharding step can come before them).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from model.base import SelfForcingModel
from model.wan.attention import resolve_backend
from model.wan.transformer import WanDiT
from model.wan.weights import load_backbone, load_strict, read_state_dict
from utils.config import method_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device(cfg: DictConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available; use device=cpu or auto")
    return torch.device("cuda", local_rank)


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def backbone_config(cfg: DictConfig) -> dict:
    """The student/critic architecture: model.backbone, or the Wan folder's transformer/config.json."""
    backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    if backbone:
        return backbone
    if cfg.model.path is None:
        raise ValueError("set model.backbone (a WanTransformer3DModel config) or model.path (a diffusers Wan folder)")
    from model.wan.folder import check_wan_folder
    from model.wan.weights import read_config

    check_wan_folder(cfg.model.path, parts=("transformer",))
    config = read_config(cfg.model.path)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_backbone(cfg: DictConfig, init: str | None) -> WanDiT:
    model = WanDiT(**backbone_config(cfg))
    if init is not None:
        load_strict(model, read_state_dict(init), source=init)
    return model


# The folder parts each Wan loader reads (model/wan/folder.py names them).
_WAN_PARTS = {"model.wan.text_encoder.WanTextEncoder": ("text_encoder", "tokenizer"), "model.wan.vae.WanVAE": ("vae",)}


def check_weight_folders(m: DictConfig) -> None:
    """Name a missing Wan file before any weights load: loading UMT5-XXL alone takes minutes."""
    from model.wan.folder import check_wan_folder

    checks = []
    for node in (m.text_encoder, m.vae):
        if node is not None and node.get("_target_") in _WAN_PARTS:
            checks.append((node.path, _WAN_PARTS[node._target_]))
    if m.path is not None and not m.backbone:
        checks.append((m.path, ("transformer",)))
    # a pipeline folder: not a .safetensors / .pt file, nor a bare transformer folder with its config.json
    teacher = Path(m.teacher_path) if m.teacher is None and m.teacher_path is not None else None
    if teacher is not None and not teacher.is_file() and not (teacher / "config.json").is_file():
        checks.append((teacher, ("transformer",)))
    for folder, parts in checks:
        check_wan_folder(folder, parts=parts)


def build_method(cfg: DictConfig, device: torch.device) -> SelfForcingModel:
    """Generator, real score, fake score, text encoder and VAE, handed to the method class."""
    m = cfg.model
    check_weight_folders(m)
    text_encoder = _frozen(instantiate(m.text_encoder)).to(device)
    vae = _frozen(instantiate(m.vae)).to(device)
    if m.teacher is not None:
        real_score = instantiate(m.teacher)
    elif m.teacher_path is not None:
        real_score = load_backbone(m.teacher_path)
    else:
        raise ValueError("model.teacher (a _target_ node) or model.teacher_path (Wan weights) must be set")
    real_score = _frozen(real_score).to(device)
    generator = build_backbone(cfg, m.generator_init)
    if m.critic_init == "generator":
        fake_score = copy.deepcopy(generator)
    elif m.critic_init == "teacher":
        if not isinstance(real_score, WanDiT):
            raise ValueError(
                f"model.critic_init=teacher needs a Wan teacher, but the teacher is {type(real_score).__name__}; "
                "use critic_init=generator or random"
            )
        fake_score = copy.deepcopy(real_score).requires_grad_(True)
    elif m.critic_init == "random":
        fake_score = build_backbone(cfg, None)
    else:  # a weights file (e.g. a pretrained bidirectional denoiser)
        fake_score = build_backbone(cfg, m.critic_init)
    dtype = DTYPES[m.dtype]
    backend = resolve_backend(m.attention_backend, device, dtype)
    fused = device.type == "cuda" if m.fused_elementwise is None else m.fused_elementwise
    compiled = device.type == "cuda" if m.get("compile_blocks") is None else m.compile_blocks
    for name, net in (("generator", generator), ("critic", fake_score)):
        # trained networks keep fp32 master weights (a 2e-6 AdamW step vanishes in bf16) and compute
        # in model.dtype under autocast, as mixed-precision training does
        net.to(device=device).float().train().requires_grad_(True)
        net.autocast_dtype = None if dtype == torch.float32 else dtype
        net.set_attention_backend(backend)
        if m.gradient_checkpointing:
            net.enable_gradient_checkpointing()
            net.checkpoint_policy = m.checkpoint_policy[name]
        net.set_fused_elementwise(fused)
        net.set_compiled_blocks(compiled)
    if isinstance(real_score, WanDiT):
        if real_score.dtype != dtype:
            real_score.to(dtype=dtype)
        real_score.set_attention_backend(backend)
        real_score.set_fused_elementwise(fused)
    cls = get_class(cfg.method._target_)
    return cls(generator, real_score, fake_score, text_encoder, vae, method_config(cfg), tuple(m.latent_shape))


def build_optimizer(params, cfg: DictConfig, max_updates: int):
    """AdamW with optional linear warm-up and cosine decay (LambdaLR over this optimizer's updates)."""
    params = [p for p in params if p.requires_grad]
    fused = cfg.get("fused")
    if fused is None:  # the fused kernel on CUDA; on the CPU foreach, as before (the toy run's numbers)
        fused = all(p.device.type == "cuda" for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps,
                                  fused=bool(fused) or None)

    def factor(update: int) -> float:
        if cfg.warmup_steps > 0 and update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            progress = min(1.0, (update - cfg.warmup_steps) / max(1, max_updates - cfg.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Batches:
    """Deterministic batches: the items of (step, micro-batch, rank) are a function of those alone.

    The data position is the step itself, so resuming needs no sampler state; every global batch
    is `total` consecutive indices (mod the dataset length), split across accumulation and ranks.
    """

    dataset: torch.utils.data.Dataset
    batch_size: int
    world_size: int
    accumulation: int

    def sample_ids(self, step: int, micro: int, rank: int) -> list[int]:
        per_step = self.batch_size * self.world_size * self.accumulation
        first = step * per_step + (micro * self.world_size + rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def get(self, step: int, micro: int, rank: int) -> tuple[list[int], dict]:
        ids = self.sample_ids(step, micro, rank)
        items = [self.dataset[i % len(self.dataset)] for i in ids]
        if isinstance(items[0], str):
            return ids, {"prompts": items}
        # dict items: prompts as a list, every tensor ("video", "latents", "ode") stacked on a batch axis
        batch = {"prompts": [it["prompts"] for it in items]}
        for key in items[0]:
            if key != "prompts":
                batch[key] = torch.stack([it[key] for it in items])
        return ids, batch
