"""Wan weights: key conversion between diffusers and original Wan, Self-Forcing checkpoints, strict loading.

Three formats hold the same tensors:
- diffusers (`WanTransformer3DModel`, the names our model uses): `blocks.0.attn1.to_q.weight`, ...
- original Wan (Wan-AI releases): `blocks.0.self_attn.q.weight`, `ffn.0`, `modulation`, `head.head`, ...
  Its `norm3` is the cross-attention norm, which diffusers calls `norm2` (the other norms have no
  parameters in either format).
- Self-Forcing `.pt` checkpoints: a dict with `generator`, `generator_ema` and/or `critic`, each an
  original-format state dict whose keys carry the wrapper prefix `model.`.
Tensors are renamed, never changed, so the conversion round-trips exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# Whole-model modules: original Wan name -> diffusers name.
_MODEL_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_MODEL_PARAMS = {"head.modulation": "scale_shift_table"}
# Per-block modules (inside `blocks.N.`): original Wan name -> diffusers name.
_BLOCK_MODULES = {
    "norm3": "norm2",  # the cross-attention norm: norm3 in Wan, norm2 in diffusers
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _wan, _hf in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK_MODULES.update({f"{_wan}.{a}": f"{_hf}.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))})
    _BLOCK_MODULES.update({f"{_wan}.norm_q": f"{_hf}.norm_q", f"{_wan}.norm_k": f"{_hf}.norm_k"})
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}

# Prefixes that wrappers add to parameter names (Self-Forcing's wrapper, FSDP1, activation
# checkpointing, torch.compile, DDP, ComfyUI-style exports).
_WRAPPER_PREFIXES = ("model.diffusion_model.", "model.", "module.", "_orig_mod.")
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
SELF_FORCING_KEYS = ("generator_ema", "generator", "critic")


class WeightMismatchError(ValueError):
    """A state dict does not match the model: lists what is missing, unexpected or misshapen."""


def _rename(key: str, modules: dict[str, str], params: dict[str, str], block_modules, block_params) -> str:
    match = re.fullmatch(r"(blocks\.\d+\.)(.+)", key)
    prefix, rest = (match.group(1), match.group(2)) if match else ("", key)
    mods, pars = (block_modules, block_params) if match else (modules, params)
    if rest in pars:
        return prefix + pars[rest]
    module, _, leaf = rest.rpartition(".")
    if module in mods and leaf in ("weight", "bias"):
        return f"{prefix}{mods[module]}.{leaf}"
    return key  # unknown keys pass through, and strict loading reports them


def wan_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-Wan state dict to diffusers' names."""
    return {_rename(k, _MODEL_MODULES, _MODEL_PARAMS, _BLOCK_MODULES, _BLOCK_PARAMS): v for k, v in state_dict.items()}


def diffusers_to_wan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers state dict to original-Wan names."""
    inverse = [{v: k for k, v in d.items()} for d in (_MODEL_MODULES, _MODEL_PARAMS, _BLOCK_MODULES, _BLOCK_PARAMS)]
    return {_rename(k, *inverse): v for k, v in state_dict.items()}


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove prefixes that training wrappers add (`model.`, `_fsdp_wrapped_module.`, ...)."""
    out = {}
    for key, value in state_dict.items():
        for infix in _WRAPPER_INFIXES:
            key = key.replace(infix, "")
        out[key] = value
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """"diffusers" or "wan", from characteristic keys; anything else is an error."""
    keys = state_dict.keys()
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(k.startswith(("time_embedding.", "head.head", "text_embedding.")) for k in keys):
        return "wan"
    raise WeightMismatchError(
        "cannot tell the checkpoint format: expected diffusers keys (condition_embedder.*) or original "
        f"Wan keys (time_embedding.*, head.head.*); the first keys are {sorted(keys)[:5]}"
    )


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout (wrapped, original Wan or diffusers) -> diffusers names."""
    state_dict = strip_wrapper_prefixes(state_dict)
    return wan_to_diffusers(state_dict) if detect_format(state_dict) == "wan" else state_dict


def select_self_forcing(checkpoint: dict, key: str | None = None) -> dict[str, torch.Tensor]:
    """Pick one network from a Self-Forcing `.pt` dict (`generator_ema` first unless `key` says)."""
    present = [k for k in SELF_FORCING_KEYS if k in checkpoint]
    if not present:
        return checkpoint  # a bare state dict
    if key is None:
        key = present[0]
    if key not in checkpoint:
        raise KeyError(f"the checkpoint holds {present}, not {key!r}")
    return checkpoint[key]


def read_state_dict(path: str | Path, key: str | None = None, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Read a transformer state dict in diffusers names from a folder, .safetensors or .pt file.

    lazy: the values are read when indexed (`value[...]` whole, `value[a:b]` rows): safetensors files
    are opened as FileTensors, a .pt file memory-mapped, so a rank that loads its shards reads only
    their rows (engine/build.py, utils/fsdp.py load_tensors)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    read = open_safetensors if lazy else _load_safetensors
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{folder} holds no .safetensors files; expected a diffusers transformer folder "
                "(config.json + diffusion_pytorch_model*.safetensors)"
            )
        return to_diffusers({k: v for f in files for k, v in read(f).items()})
    if path.suffix == ".safetensors":
        return to_diffusers(read(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict):
        raise WeightMismatchError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return to_diffusers(select_self_forcing(checkpoint, key))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class FileTensor:
    """A tensor of a safetensors file, read when indexed: `[...]` the whole tensor, `[a:b]` rows a to b.
    The file is memory-mapped, so reading rows touches only their pages."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name
        self.slice = handle.get_slice(name)
        self.shape = torch.Size(self.slice.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        if index is Ellipsis:
            return self.handle.get_tensor(self.name)
        return self.slice[index]


def open_safetensors(path: Path) -> dict[str, FileTensor]:
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt", device="cpu")
    return {name: FileTensor(handle, name) for name in handle.keys()}


def check_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Raise WeightMismatchError unless the names and shapes match the model exactly."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    raise_on_mismatch(missing, unexpected, misshapen, f"{source} does not match the model ({type(model).__name__})")


def raise_on_mismatch(missing, unexpected, misshapen, what: str) -> None:
    """Raise a WeightMismatchError that counts and lists (the first few of) each kind of mismatch."""
    if not (missing or unexpected or misshapen):
        return
    parts = [f"{what}:"]
    for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if items:
            items = [str(i) for i in items]
            more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"  {len(items)} {name}: {', '.join(items[:5])}{more}")
    raise WeightMismatchError("\n".join(parts))


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    check_keys(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def read_config(config: str | Path | dict) -> dict:
    """A model config from a dict, a config.json, or a diffusers (pipeline or transformer) folder."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "transformer" / "config.json" if (path / "transformer").is_dir() else path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}; expected a diffusers config.json")
    return json.loads(path.read_text())


def backbone_config(backbone: dict | None, path: str | Path | None, what: str = "a WanTransformer3DModel config") -> dict:
    """A DiT's constructor arguments: `backbone` (model.backbone as a dict) when it is set, else the transformer
    config of the diffusers Wan folder `path` without its private (`_`) keys."""
    if backbone:
        return dict(backbone)
    if path is None:
        raise ValueError(f"set model.backbone ({what}) or model.path (a diffusers Wan folder)")
    from model.wan.folder import check_wan_folder

    check_wan_folder(path, parts=("transformer",))
    return {k: v for k, v in read_config(path).items() if not k.startswith("_")}


def load_backbone(path: str | Path, config: str | Path | dict | None = None, *, key: str | None = None, cls=None):
    """Build a WanDiT and load weights from any supported format, strictly.

    `path`: a diffusers folder (pipeline root or transformer/), a .safetensors file (diffusers or
    Wan names) or a .pt file (Self-Forcing dict or bare state dict). `config`: the model config for
    files that carry none (defaults to the folder's own config.json). `key`: which network of a
    Self-Forcing checkpoint (generator_ema, generator, critic).
    """
    from .transformer import WanDiT

    cls = cls or WanDiT
    path = Path(path)
    if config is None:
        if not path.is_dir():
            raise ValueError(f"{path} carries no model config: pass config= (a dict, config.json or diffusers folder)")
        config = path
    model = cls.from_config(read_config(config))
    load_strict(model, read_state_dict(path, key), source=str(path))
    return model
