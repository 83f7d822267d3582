"""Load a trained student for inference: where its weights are, the config that describes them, and
the generator, text encoder and VAE built from it with the speed levers applied.

`resolve_checkpoint` accepts a run directory, a step directory, an exported model.safetensors (with
the config.json training wrote beside it), a LoRA generator's exported adapter_model.safetensors (put
onto its base, model.generator_init, and merged; engine/lora.py; a directory takes the export's merged
model.safetensors where there is one) or an original Self-Forcing .pt, and chooses EMA or raw
generator weights without loading tensors; `run_config` gives the {model, method, data} config that
describes them; `build_student` builds the `Student` the generation loop (engine/inference.py) runs.

An export is plain data (safetensors + JSON) and may come from anyone: its config is checked by
`check_targets` before anything in it is built, so it can only build this project's own classes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from model.base import MethodConfig, RolloutParts
from model.wan.attention import resolve_backend
from model.wan.kv_cache import CrossAttnCache, KVCache
from model.wan.transformer import WanDiT
from model.wan.weights import SELF_FORCING_KEYS, load_strict, read_state_dict
from pipeline.cuda_graphs import ChunkGraphs
from engine.build import DTYPES, backbone_config
from engine.config import method_class, relative_hint
from engine.lora import ADAPTER_WEIGHTS, add_adapters, load_adapter, lora_spec
from utils.checkpoint import CheckpointManager
from utils.checkpoint_dirs import find_checkpoint
from utils.speed import SpeedSchema, apply_levers, resolve_levers
from utils.toy_metrics import match_rule

GROUPS = ("model", "method", "data")  # config groups shared with training
CHECKPOINT_FORMS = (
    "a training run directory, a step directory (<run>/checkpoints/step_XXXXXX), an exported "
    "model.safetensors (or a LoRA adapter_model.safetensors) with its config.json beside it, or a Self-Forcing .pt "
    "holding generator / generator_ema"
)
# The packages whose classes a checkpoint's config may build (`check_targets`): the project's own.
TRUSTED_PACKAGES = ("model.", "utils.data.")
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# diffusers' ModelMixin.to(dtype) warns on every cast that `_keep_in_fp32_modules` (WanDiT: rope, time
# embedder, modulation, norms) should stay float32. Irrelevant here: the student runs wholly in
# model.dtype as Self-Forcing's does, and WanDiT computes RoPE, modulation and norms in float32 itself
# (model/wan/transformer.py). Only this message is dropped, only while the student is built.
FP32_CAST_WARNING = ("diffusers.models.modeling_utils", r"There are modules in \w+ that should be kept in float32")


# ---------------------------------------------------------------------------- the checkpoint
@dataclass
class Source:
    """Where the weights are and which config describes them (None: the config groups)."""

    path: Path  # the file the weights come from
    config: dict | None  # export/config.json, or None for a Self-Forcing .pt
    weights: str  # "ema" | "generator": what is loaded
    key: str | None = None  # the .pt entry (generator_ema / generator)
    step_dir: Path | None = None  # resume state holding the raw generator (use_ema=false on an EMA export)
    config_file: Path | None = None  # where `config` was read: named when its config is refused

    @property
    def config_origin(self) -> str:
        return str(self.config_file) if self.config_file is not None else "the model / method / data config groups"


def resolve_checkpoint(checkpoint: str, use_ema: bool | None) -> Source:
    """Find the weights `checkpoint` names and decide EMA vs generator, without loading tensors."""
    path = Path(str(checkpoint)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist; expected {CHECKPOINT_FORMS}")
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return _self_forcing_source(path, use_ema)
    if path.is_dir():
        export = find_checkpoint(path) / "export" / "model.safetensors"
        if not export.is_file() and (export.parent / ADAPTER_WEIGHTS).is_file():  # LoRA, exported unmerged
            export = export.parent / ADAPTER_WEIGHTS
    elif path.suffix == ".safetensors":
        export = path
    else:
        raise ValueError(f"checkpoint={checkpoint} is neither a directory, a .safetensors nor a .pt file; expected {CHECKPOINT_FORMS}")
    config_path = export.parent / "config.json"
    if not export.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"{export.parent} lacks {export.name} or config.json; expected a training export")
    config = json.loads(config_path.read_text())
    lacking = [k for k in ("backbone", "method", "model", "data", "weights") if k not in config]
    if lacking:
        raise ValueError(
            f"{config_path} lacks {lacking}: not a training export (utils/checkpoint.py). For bare weights, "
            "convert them to a Self-Forcing .pt and choose the model with model=... method=... data=..."
        )
    step_dir = export.parent.parent if (export.parent.parent / "meta.json").is_file() else None
    exported = config["weights"]
    if use_ema is True and exported != "ema":
        raise ValueError(
            f"use_ema=true, but {export} holds the raw generator: it was exported before EMA started "
            f"(ema_start_step). Pass use_ema=false (or leave it null) to use the generator, or a later checkpoint"
        )
    if use_ema is False and exported == "ema":
        if step_dir is None:
            raise ValueError(
                f"use_ema=false, but {export} holds only the EMA weights; the raw generator is in the step "
                "directory's resume state: pass checkpoint=<run>/checkpoints/step_XXXXXX use_ema=false"
            )
        return Source(step_dir, config, "generator", step_dir=step_dir, config_file=config_path)
    return Source(export, config, exported, config_file=config_path)


def _self_forcing_source(path: Path, use_ema: bool | None) -> Source:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    present = [k for k in SELF_FORCING_KEYS if isinstance(checkpoint, dict) and k in checkpoint]
    if not present or present == ["critic"]:
        raise ValueError(f"{path} holds neither 'generator_ema' nor 'generator'; expected a Self-Forcing checkpoint")
    wanted = {True: ["generator_ema"], False: ["generator"], None: ["generator_ema", "generator"]}[use_ema]
    key = next((k for k in wanted if k in present), None)
    if key is None:
        raise KeyError(f"use_ema={str(use_ema).lower()} asks for {wanted[0]!r}, but {path} holds {present}; "
                       f"pass use_ema={'false' if use_ema else 'true'}")
    return Source(path, None, "ema" if key == "generator_ema" else "generator", key=key)


def group_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's overrides of the model / method / data groups: their keys (`model.dtype`) or
    group choices (`model`); for an export they apply on top of its config.json."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    out = []
    for o in parsed:
        if o.key_or_group.split(".")[0] in GROUPS:
            out.append(("~" if o.is_delete() else "") + o.key_or_group)
    return out


def run_config(cfg: DictConfig, source: Source, overrides: list[str]) -> DictConfig:
    """{model, method, data} describing the student: export/config.json with the command line's key
    overrides on top, or, for a Self-Forcing .pt, the config groups of inference.yaml."""
    if source.config is None:
        node = OmegaConf.create({g: OmegaConf.to_container(cfg[g], resolve=False) for g in GROUPS})
    else:
        node = OmegaConf.create({g: source.config[g] for g in GROUPS})
        if not node.model.backbone:  # trained from model.path: the export holds the folder's config, resolved
            node.model.backbone = source.config["backbone"]
        for key in overrides:
            if "." not in key or key.startswith("~"):
                raise ValueError(
                    f"the override {key!r} picks or removes a config group, but {source.path} is a training "
                    "export whose config.json fixes the model; override single keys (e.g. model.dtype=bfloat16)"
                )
            OmegaConf.update(node, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    # before anything in it is built (data.world, text encoder, VAE): as written, so a bad target is named
    # even where its node breaks an interpolation, and as resolved (an interpolation can make new nodes)
    check_targets(node, source.config_origin)
    OmegaConf.resolve(node)
    check_targets(node, source.config_origin)
    return node


def check_targets(node: Any, origin: str) -> None:
    """Refuse a config that would build anything but this project's own classes, before anything is built.

    Hydra's `instantiate` calls whatever `_target_` names, so a crafted export config.json could run
    `pathlib.Path.unlink` or `os.system`. Every `_target_` in `node` (nested nodes, `_args_` and lists
    included) must be a class defined in one of TRUSTED_PACKAGES. The module prefix is checked as a
    string first, so only the project's own modules are ever imported (`model` and `utils` are this
    project's packages, already imported), then the class: `get_class` refuses functions, and the class
    must be defined where the name says (not a foreign class re-exported by a project module).
    Interpolations are not resolved here: a `_target_` written as one is refused.
    Raises a one-line ValueError naming `origin` (the config's file), the key and the target."""
    for key, target in _targets(OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node):
        reason = _untrusted(target)
        if reason:
            raise ValueError(f"{origin}: {key}={target!r} is refused ({reason}); a checkpoint's config may only "
                             f"build classes defined in this project's {' / '.join(p + '*' for p in TRUSTED_PACKAGES)}")


def _targets(node: Any, key: str = ""):
    """(key path, value) of every `_target_` in a plain container, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield path, v
            else:
                yield from _targets(v, path)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def _untrusted(target: Any) -> str | None:
    """Why `target` may not be built, or None when it is a class of the project's trusted packages."""
    if not isinstance(target, str) or not _DOTTED_NAME.fullmatch(target):
        return "not a dotted class name"
    if not target.startswith(TRUSTED_PACKAGES):
        return "outside the project's packages"
    try:
        with without_log("hydra.utils", "Error getting class at "):  # the ValueError below says it in one line
            cls = get_class(target)
    except Exception as e:  # not found, or found but not a class (a function, a module)
        return f"not a class: {str(e).splitlines()[0]}"
    defined = f"{cls.__module__}.{cls.__qualname__}"
    if defined != target or not f"{cls.__module__}.".startswith(TRUSTED_PACKAGES):
        return f"it is {defined}, defined outside the project's packages"
    return None


@contextlib.contextmanager
def without_log(logger: str, pattern: str):
    """Drop the records of `logger` whose message matches `pattern` (re.match), inside the block only;
    the logger's other records, and these anywhere else, are untouched (no verbosity change)."""
    drop = re.compile(pattern)

    def keep(record: logging.LogRecord) -> bool:
        return drop.match(record.getMessage()) is None

    target = logging.getLogger(logger)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


# ---------------------------------------------------------------------------- the student
@dataclass
class Student(RolloutParts):
    """The generator and how it rolls out: the method's own rollout pieces (model/base.py RolloutParts:
    schedule, steps, pattern, encode), so training's evaluation and inference cannot drift apart."""

    generator: WanDiT
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    cfg: MethodConfig
    latent_shape: tuple
    world: Any = None  # the toy world, for ground-truth metrics
    match_rule: dict | None = None  # utils/toy_metrics.match_rule of the run's data.metrics
    runner: Any = None  # what the rollout calls: the generator, or its CUDA graphs (utils/speed.py)
    decode_stream: Any = None  # a CUDA stream that chunks decode on, overlapping the generator; None: in line

    def __post_init__(self):
        self.init_rollout(self.cfg, self.latent_shape)
        self.runner = self.runner or self.generator
        self._caches: tuple = (None, None, None)  # (key, KVCache, CrossAttnCache), kept across batches

    def caches(self, batch: int, num_frames: int, pattern, latent_hw) -> tuple[KVCache, CrossAttnCache]:
        """Static KV and cross-attention caches, reset, reused while the batch and clip shape stay."""
        key = (batch, num_frames, pattern, tuple(latent_hw))
        if self._caches[0] != key:
            if isinstance(self.runner, ChunkGraphs):  # graphs captured against the old caches
                self.runner.clear()
            self._caches = (None, None, None)  # free the old cache before allocating the new one
            kv = KVCache.for_model(self.generator, pattern, batch_size=batch, latent_hw=latent_hw, max_frames=num_frames)
            self._caches = (key, kv, CrossAttnCache(self.generator.config.num_layers))
        _, kv, cross = self._caches
        kv.reset()
        cross.reset()
        return kv, cross


def lora_base(m: DictConfig, source: Source) -> str:
    """The base weights a LoRA adapter export was trained on: its model.generator_init."""
    base = m.generator_init
    if base is None:
        raise ValueError(f"{source.path} is a LoRA adapter without its base weights, and model.generator_init is "
                         "null (the base was random); pass model.generator_init=<base weights>, or use an export "
                         "trained with model.lora.export_merged=true")
    if not Path(base).exists():
        raise FileNotFoundError(f"model.generator_init={base!r}, the base weights of the LoRA adapter {source.path}, "
                                f"does not exist{relative_hint(base)}; pass model.generator_init=<base weights>")
    return str(base)


def build_student(node: DictConfig, method: MethodConfig, source: Source, device: torch.device, world=None,
                  speed=None) -> Student:
    check_targets(node, source.config_origin)  # also when called without run_config
    m = node.model
    # the network the method exports (a WanDiT; DCM's holds its two experts), its weights loaded strictly below
    method_node = OmegaConf.to_container(node.method, resolve=True)
    generator = method_class(node).inference_generator(backbone_config(node), method_node)
    if source.step_dir is not None:  # the raw generator from the DCP resume state
        lora = lora_spec(node, "generator") if "lora" in m else None
        tuner = add_adapters(generator, lora, "generator") if lora is not None else None  # its state has them
        CheckpointManager(source.step_dir.parent.parent, keep=0).load(source.step_dir, {"generator": generator})
        generator = tuner.merge_and_unload() if tuner is not None else generator
    elif source.path.name == ADAPTER_WEIGHTS:  # a LoRA export: the adapter onto its base, merged
        base = lora_base(m, source)
        load_strict(generator, read_state_dict(base), source=base)
        generator = load_adapter(generator, source.path.parent)
    else:
        load_strict(generator, read_state_dict(source.path, source.key), source=str(source.path))
    with without_log(*FP32_CAST_WARNING):
        generator.to(device=device, dtype=DTYPES[m.dtype]).eval().requires_grad_(False)
        text_encoder = instantiate(m.text_encoder).eval().requires_grad_(False).to(device)
        vae = instantiate(m.vae).eval().requires_grad_(False).to(device)
    backend = resolve_backend(m.attention_backend, device, DTYPES[m.dtype])
    generator.set_attention_backend(backend)
    metrics = node.data.get("metrics")
    rule = match_rule(metrics) if world is not None and metrics is not None else None
    levers = resolve_levers(speed if speed is not None else SpeedSchema(), device, m.attention_backend)
    runner, stream = apply_levers(generator, vae, levers)
    return Student(generator, text_encoder, vae, method, tuple(m.latent_shape), world, rule, runner, stream)
