"""LoRA students and critics through peft: adapters on a trained network's linear layers, its base frozen.

`model.lora.<network>.rank > 0` makes build_networks inject peft's LoRA layers into the modules that
`targets` names, in place (`inject_adapter_in_model`: the network stays a WanDiT, so the methods, the
KV cache and FSDP2 see the class they know), and peft freezes every other weight: the network's
AdamW, its gradients, its EMA (utils/ema.py averages trained parameters only) hold the adapters.
The DCP checkpoint holds the whole network (frozen base included, so resume needs no base file) and
the adapters' optimizer state.

The export of a LoRA generator is a peft adapter (`adapter_model.safetensors` with
`get_peft_model_state_dict`'s names, e.g. `blocks.0.attn1.to_q.lora_A.weight`, and
`adapter_config.json`), the files `PeftModel.save_pretrained` and diffusers' `save_lora_adapter`
write; with model.lora.export_merged also the merged full weights (`model.safetensors`, as a full
fine-tune's). Inference (engine/student.py) loads the merged weights, or the adapter onto its base
(model.generator_init). peft is imported only when LoRA is on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names (PeftModel.save_pretrained)
ADAPTER_CONFIG = "adapter_config.json"


def lora_spec(cfg: DictConfig, name: str) -> DictConfig | None:
    """model.lora.<name> when it asks for adapters (rank > 0), else None: full fine-tuning."""
    node = cfg.model.lora.get(name)
    return node if node is not None and node.rank > 0 else None


def peft_config(spec: DictConfig):
    from peft import LoraConfig

    alpha = spec.alpha if spec.alpha is not None else spec.rank
    return LoraConfig(r=int(spec.rank), lora_alpha=float(alpha), target_modules=list(spec.targets),
                      lora_dropout=float(spec.dropout))


def adapter_config(spec: DictConfig) -> dict:
    """adapter_config.json as PeftConfig.save_pretrained writes it (its sets as lists)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config(spec).to_dict().items()}


def _linear_names(module: nn.Module) -> list[str]:
    """Names of the linear layers of one block (or of the whole module), to suggest targets."""
    from utils.fsdp import block_modules

    blocks = block_modules(module)
    root = blocks[0] if blocks else module
    return sorted(n for n, m in root.named_modules() if isinstance(m, nn.Linear))


def add_adapters(module: nn.Module, spec: DictConfig, name: str):
    """Inject LoRA layers into `module` in place and freeze its base weights; returns peft's LoraModel
    (its `merge_and_unload` folds them back in). Every target must name linear layers: a typo would
    otherwise train fewer layers than asked, silently, wherever another target matched."""
    for target in spec.targets:
        # peft's rule for a list of targets: the module's name or its last dot-separated components
        found = [m for n, m in module.named_modules() if n == target or n.endswith("." + target)]
        if not found or not all(isinstance(m, nn.Linear) for m in found):
            what = "no module" if not found else \
                f"a {type(next(m for m in found if not isinstance(m, nn.Linear))).__name__}, not a linear layer,"
            raise ValueError(f"model.lora.{name}.targets: {target!r} names {what} of the {name} ({type(module).__name__}); "
                             f"the linear layers of a block are {_linear_names(module)}")
    from peft.tuners.lora import LoraModel

    return LoraModel(module, peft_config(spec), "default")  # what peft.inject_adapter_in_model does


def initial_adapters(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial values as a function of `seed` and their names alone: lora_A uniform in
    +-1/sqrt(fan_in) (the bound of peft's kaiming_uniform_(a=sqrt(5))), drawn in name order from one CPU
    generator, and lora_B zeros (so the adapted network starts as its base). peft's own draws come from
    the global RNG in its injection order, on the module's device; these are the same on every rank,
    device and world size, whether the network is built whole or on the meta device and sharded
    (engine/build.py fills each rank's rows of them)."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in sorted(module.named_parameters()):
        if is_adapter(name):
            if ".lora_A." in name:
                bound = 1.0 / p.shape[1] ** 0.5
                values[name] = torch.empty(tuple(p.shape)).uniform_(-bound, bound, generator=gen)
            else:
                values[name] = torch.zeros(tuple(p.shape))
    return values


def is_adapter(key: str) -> bool:
    return ".lora_" in key  # peft's lora_A / lora_B parameters


def adapter_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of `weights` (state-dict names of `module`) in peft's file names (no adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, state_dict={k: v for k, v in weights.items() if is_adapter(k)})


def merged_weights(backbone: dict, spec: DictConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full weights with the adapters folded in by peft's merge, from a LoRA network's whole state dict
    (base and adapters, on the CPU)."""
    from model.wan.transformer import WanDiT

    with torch.device("meta"):  # no memory: the state dict's tensors are assigned below
        model = WanDiT(**backbone)
    tuner = add_adapters(model, spec, "generator")
    # the merge adds into the adapted base weights: copies, as a one-process state dict may be the live weights
    weights = {k: v.clone() if ".base_layer." in k else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return dict(tuner.merge_and_unload().state_dict())


def load_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """`model` (its base weights loaded) with the peft adapter of `folder` merged in; the plain model."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import LoraModel
    from safetensors.torch import load_file

    tuner = LoraModel(model, LoraConfig.from_pretrained(str(folder)), "default")
    loaded = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))
    missing = [k for k in loaded.missing_keys if is_adapter(k)]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS} does not fit {ADAPTER_CONFIG}'s adapters: missing {missing[:3]}, "
                         f"unexpected {list(loaded.unexpected_keys)[:3]}")
    return tuner.merge_and_unload()
