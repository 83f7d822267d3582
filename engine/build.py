"""Build a training run's parts from the config: the networks a method declares, the method, optimizers.

Plain code, in the order torchtitan uses: build the networks (on the meta device where they come from
weight files), set their precision and training mode, shard them, then materialise their weights
(each rank its shards), hand them to the method; optimizers last, over the shards.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from model.base import SelfForcingModel
from model.wan.attention import resolve_backend
from model.wan.transformer import WanDiT
from model.wan.weights import load_backbone, load_strict, raise_on_mismatch, read_config, read_state_dict
from engine.config import method_class, method_config
from engine.lora import add_adapters, initial_adapters, is_adapter, lora_spec
from engine.quantize import check_precision, is_quantized, quantize_linear, log_precision, set_precision
from utils.fsdp import load_tensors, materialize, shard_networks
from utils.sample_rng import mix_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def backbone_config(cfg: DictConfig) -> dict:
    """The student/critic architecture: model.backbone, or the Wan folder's transformer/config.json."""
    from model.wan.weights import backbone_config as from_node_or_folder

    return from_node_or_folder(OmegaConf.to_container(cfg.model.backbone, resolve=True), cfg.model.path)


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


# ---------------------------------------------------------------- sharded loading (model.sharded_loading)
@dataclass
class Deferred:
    """A network built on the meta device: after sharding, each rank reads its rows of `tensors()`
    (state-dict names -> lazily read tensors, model/wan/weights.py)."""

    tensors: Callable[[], dict]
    source: str


def _on_meta(fn):
    """fn() with its parameters on the meta device; buffers (RoPE tables) are computed as usual."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return fn()


def _deferred_backbone(make, path) -> tuple[torch.nn.Module, Deferred]:
    return _on_meta(make), Deferred(lambda: read_state_dict(path, lazy=True), str(path))


def _deferred_target(node) -> tuple[torch.nn.Module, Deferred] | None:
    """A _target_ class that can be built empty (`load=False`) and names its tensors (`weight_tensors()`)."""
    if node is None or not hasattr(get_class(node._target_), "weight_tensors"):
        return None
    module = instantiate(node, load=False)
    return module, Deferred(module.weight_tensors, str(node.get("path", node._target_)))


def _deferred_teacher(cfg, built, deferred):
    m = cfg.model
    if m.teacher is not None:
        return _deferred_target(m.teacher)
    if m.teacher_path is None:
        return None  # _build_teacher names the missing key
    path = Path(m.teacher_path)
    if not path.is_dir():  # load_backbone's error: a file carries no config
        raise ValueError(f"{path} carries no model config: model.teacher_path must be a diffusers folder")
    return _deferred_backbone(lambda: WanDiT.from_config(read_config(path)), path)


def _deferred_critic(cfg, built, deferred):
    init = cfg.model.critic_init
    if init in ("generator", "teacher"):
        source = built.get(init)
        if init not in deferred or not isinstance(source, WanDiT):
            return None  # built whole (or an error of _build_critic's)
        return copy.deepcopy(source).requires_grad_(True), deferred[init]
    if init == "random":
        return None
    return _deferred_backbone(lambda: WanDiT(**backbone_config(cfg)), init)


DEFERRED = {  # fn(cfg, built, deferred) -> (module on the meta device, Deferred), or None: build it whole
    "text_encoder": lambda cfg, built, deferred: _deferred_target(cfg.model.text_encoder),
    "vae": lambda cfg, built, deferred: None,  # small, and not sharded
    "teacher": _deferred_teacher,
    "generator": lambda cfg, built, deferred: None if cfg.model.generator_init is None else
    _deferred_backbone(lambda: WanDiT(**backbone_config(cfg)), cfg.model.generator_init),
    "critic": _deferred_critic,
}


def _lora_view(module: torch.nn.Module, tensors: dict) -> tuple[dict, list[str]]:
    """A LoRA network's base weights under its own names (peft moved `to_q.weight` to `to_q.base_layer.weight`),
    and the file's names nothing took."""
    view, used = {}, set()
    for name in module.state_dict(keep_vars=True):
        key = name.replace(".base_layer.", ".")
        if not is_adapter(name) and key in tensors:
            view[name] = tensors[key]
            used.add(key)
    return view, sorted(set(tensors) - used)


def precision_of(cfg: DictConfig, name: str) -> str | None:
    value = cfg.model.precision.get(name)
    return None if value is None else str(value)


def build_networks(cls, cfg: DictConfig, device: torch.device, mesh=None) -> dict[str, torch.nn.Module]:
    """The networks `cls.networks` declares, in declaration order, on `device`: frozen ones in eval mode
    without gradients (stored at model.precision.<name>: engine/quantize.py), trained ones as fp32 master
    weights computing in model.dtype (with model.lora.<name>: only its peft LoRA adapters train,
    engine/lora.py).

    With a mesh they are also sharded (FSDP2, utils/fsdp.py). With model.sharded_loading, the networks
    read from weight files (teacher, generator / critic inits, the UMT5 text encoder) are built on the
    meta device, sharded there, and each rank then reads only its shards' rows: no rank holds a whole
    copy, on its GPU or in host memory (int8 / fp8 networks are not sharded: each rank quantises its whole
    copy layer by layer as it reads it). Otherwise every rank builds them whole first, as before."""
    m = cfg.model
    precision = {name: precision_of(cfg, name) for name in cls.networks}
    for name, net in cls.networks.items():
        check_precision(name, precision[name], net.trained, device)
    on_meta = mesh is not None and m.sharded_loading
    built: dict[str, torch.nn.Module] = {}
    deferred: dict[str, Deferred] = {}
    for name, net in cls.networks.items():
        made = DEFERRED[net.build](cfg, built, deferred) if on_meta and isinstance(net.build, str) else None
        if made is not None:
            module, deferred[name] = made
        else:
            module = BUILDERS[net.build](cfg, built) if isinstance(net.build, str) else net.build(cfg, built)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{cls.__name__}.networks[{name!r}] was built as {type(module).__name__}, not an nn.Module")
        if not net.trained:
            module = _frozen(module) if name in deferred else _frozen(module).to(device)
        built[name] = module
    dtype = DTYPES[m.dtype]
    backend = resolve_backend(m.attention_backend, device, dtype)
    fused = device.type == "cuda" if m.fused_elementwise is None else m.fused_elementwise
    compiled = device.type == "cuda" if m.compile_blocks is None else m.compile_blocks
    for name, module in built.items():
        if cls.networks[name].trained:
            # trained networks keep fp32 master weights (a 2e-6 AdamW step vanishes in bf16) and compute
            # in model.dtype under autocast, as mixed-precision training does
            if name not in deferred:
                module.to(device=device)
            module.float().train().requires_grad_(True)
            lora = lora_spec(cfg, name)
            if lora is not None:  # peft's adapters (fp32, on the device) train; it freezes the rest
                add_adapters(module, lora, name)
                if name not in deferred:
                    load_tensors(module, initial_adapters(module, mix_seed(cfg.seed, 0, f"lora_{name}")), strict=False)
            if isinstance(module, WanDiT):
                module.autocast_dtype = None if dtype == torch.float32 else dtype
                module.set_attention_backend(backend)
                if m.gradient_checkpointing:
                    module.enable_gradient_checkpointing()
                    module.checkpoint_policy = m.checkpoint_policy.get(name, "full")
                module.set_fused_elementwise(fused)
                module.set_compiled_blocks(compiled)
            continue
        if isinstance(module, WanDiT):  # a frozen Wan network (the teacher): stored in model.dtype
            if module.dtype != dtype:
                module.to(dtype=dtype)
            module.set_attention_backend(backend)
            module.set_fused_elementwise(fused)
        if precision[name] == "bf16" or (precision[name] is not None and name not in deferred):
            set_precision(module, name, precision[name])  # deferred int8 / fp8 networks: as their layers load
    if mesh is not None:
        _shard(cls, built, precision, cfg, mesh)
    for name, source in deferred.items():
        _load_deferred(cfg, name, built[name], source, precision[name], device)
    return built


def _load_deferred(cfg, name: str, module: torch.nn.Module, source: Deferred, precision: str | None,
                   device: torch.device) -> None:
    """Allocate a meta-built network (each rank its shards) and read its weights; quantise it layer by layer."""
    tensors, unexpected = source.tensors(), []
    if lora_spec(cfg, name) is not None:
        tensors, unexpected = _lora_view(module, tensors)
        tensors.update(initial_adapters(module, mix_seed(cfg.seed, 0, f"lora_{name}")))
    after = None
    if is_quantized(precision):
        def after(sub):  # noqa: E306
            if isinstance(sub, torch.nn.Linear):
                quantize_linear(sub, precision)
    offload = bool(cfg.fsdp.cpu_offload.get(name, False))
    missing, extra, misshapen = materialize(module, torch.device("cpu") if offload else device, tensors, after)
    raise_on_mismatch(missing, sorted(unexpected + extra), misshapen,
                      f"{source.source} does not match the {name} ({type(module).__name__})")
    if is_quantized(precision):
        log_precision(module, name, precision)


def _shard(cls, built: dict, precision: dict, cfg: DictConfig, mesh) -> None:
    """FSDP2 on the networks the method declares sharded, but not quantised ones (engine/quantize.py)."""
    networks = []
    for name, spec in cls.networks.items():
        if not spec.shard or built.get(name) is None:
            continue
        if is_quantized(precision[name]):
            if cfg.fsdp.cpu_offload.get(name, False):
                raise ValueError(f"fsdp.cpu_offload.{name}=true with model.precision.{name}={precision[name]}: a "
                                 "quantised network is not sharded (FSDP2 cannot split torchao's tensors), so it has "
                                 "no shards to offload; set one of them back")
            continue
        networks.append((name, built[name], spec.trained, spec.blocks))
    shard_networks(networks, cfg.fsdp, DTYPES[cfg.model.dtype], mesh)


def build_method(cfg: DictConfig, device: torch.device, mesh=None) -> SelfForcingModel:
    """The method with the networks it declares (model/contract.py), built from the model config;
    with a mesh, sharded (and, with model.sharded_loading, loaded shard by shard: build_networks)."""
    check_weight_folders(cfg.model)
    cls = method_class(cfg)
    built = build_networks(cls, cfg, device, mesh)
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
    """FSDP2 on the networks of a method built without a mesh (whole, on every rank), before any optimizer
    exists; build_method(cfg, device, mesh) does this itself, and can load shard by shard."""
    cls = type(method)
    built = {name: getattr(method, spec.attr) for name, spec in cls.networks.items()}
    _shard(cls, built, {name: precision_of(cfg, name) for name in cls.networks}, cfg, mesh)
