"""Build a training run's parts from the config: the networks a method declares, the method, optimizers.

Plain code, in the order torchtitan uses: build the networks, set their precision and training
mode, hand them to the method; optimizers last (so a later sharding step can come before them).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from model.base import SelfForcingModel
from model.wan.attention import resolve_backend
from model.wan.transformer import WanDiT
from model.wan.weights import load_backbone, load_strict, read_state_dict
from engine.config import method_class, method_config
from engine.lora import add_adapters, lora_spec
from utils.fsdp import shard_networks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def _build_teacher(cfg: DictConfig, built: dict) -> torch.nn.Module:
    m = cfg.model
    if m.teacher is not None:
        return instantiate(m.teacher)
    if m.teacher_path is not None:
        return load_backbone(m.teacher_path)
    raise ValueError("model.teacher (a _target_ node) or model.teacher_path (Wan weights) must be set")


def _build_critic(cfg: DictConfig, built: dict) -> torch.nn.Module:
    init = cfg.model.critic_init
    if init == "generator":
        if "generator" not in built:
            raise ValueError("model.critic_init=generator: the method must declare the generator before the critic")
        return copy.deepcopy(built["generator"])
    if init == "teacher":
        teacher = built.get("teacher")
        if not isinstance(teacher, WanDiT):
            raise ValueError(
                f"model.critic_init=teacher needs a Wan teacher, but the teacher is {type(teacher).__name__}; "
                "use critic_init=generator or random"
            )
        return copy.deepcopy(teacher).requires_grad_(True)
    if init == "random":
        return build_backbone(cfg, None)
    return build_backbone(cfg, init)  # a weights file (e.g. a pretrained bidirectional denoiser)


# The engine's builders that model.contract.BUILDERS names: fn(cfg, networks built so far) -> module.
BUILDERS = {
    "text_encoder": lambda cfg, built: instantiate(cfg.model.text_encoder),
    "vae": lambda cfg, built: instantiate(cfg.model.vae),
    "teacher": _build_teacher,
    "generator": lambda cfg, built: build_backbone(cfg, cfg.model.generator_init),
    "critic": _build_critic,
}


def build_networks(cls, cfg: DictConfig, device: torch.device) -> dict[str, torch.nn.Module]:
    """The networks `cls.networks` declares, in declaration order, on `device`: frozen ones in eval mode
    without gradients, trained ones as fp32 master weights computing in model.dtype (with model.lora.<name>:
    only its peft LoRA adapters train, engine/lora.py)."""
    m = cfg.model
    built: dict[str, torch.nn.Module] = {}
    for name, net in cls.networks.items():
        module = BUILDERS[net.build](cfg, built) if isinstance(net.build, str) else net.build(cfg, built)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{cls.__name__}.networks[{name!r}] was built as {type(module).__name__}, not an nn.Module")
        built[name] = module if net.trained else _frozen(module).to(device)
    dtype = DTYPES[m.dtype]
    backend = resolve_backend(m.attention_backend, device, dtype)
    fused = device.type == "cuda" if m.fused_elementwise is None else m.fused_elementwise
    compiled = device.type == "cuda" if m.compile_blocks is None else m.compile_blocks
    for name, module in built.items():
        if cls.networks[name].trained:
            # trained networks keep fp32 master weights (a 2e-6 AdamW step vanishes in bf16) and compute
            # in model.dtype under autocast, as mixed-precision training does
            module.to(device=device).float().train().requires_grad_(True)
            lora = lora_spec(cfg, name)
            if lora is not None:  # peft's adapters (fp32, on the device) train; it freezes the rest
                add_adapters(module, lora, name)
            if isinstance(module, WanDiT):
                module.autocast_dtype = None if dtype == torch.float32 else dtype
                module.set_attention_backend(backend)
                if m.gradient_checkpointing:
                    module.enable_gradient_checkpointing()
                    module.checkpoint_policy = m.checkpoint_policy.get(name, "full")
                module.set_fused_elementwise(fused)
                module.set_compiled_blocks(compiled)
        elif isinstance(module, WanDiT):  # a frozen Wan network (the teacher): stored in model.dtype
            if module.dtype != dtype:
                module.to(dtype=dtype)
            module.set_attention_backend(backend)
            module.set_fused_elementwise(fused)
    return built


def build_method(cfg: DictConfig, device: torch.device) -> SelfForcingModel:
    """The method with the networks it declares (model/contract.py), built from the model config."""
    check_weight_folders(cfg.model)
    cls = method_class(cfg)
    built = build_networks(cls, cfg, device)
    modules = {net.attr: built[name] for name, net in cls.networks.items()}
    standard = {"generator": None, "real_score": None, "fake_score": None, "text_encoder": None, "vae": None}
    return cls(**(standard | modules), cfg=method_config(cfg), latent_shape=tuple(cfg.model.latent_shape))


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


def shard_method(method: SelfForcingModel, cfg: DictConfig, mesh) -> None:
    """FSDP2 on the networks the method declares sharded (model/contract.py), before any optimizer exists."""
    networks = [(name, getattr(method, spec.attr), spec.trained, spec.blocks)
                for name, spec in type(method).networks.items() if spec.shard and getattr(method, spec.attr) is not None]
    shard_networks(networks, cfg.fsdp, DTYPES[cfg.model.dtype], mesh)
