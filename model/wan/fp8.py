"""speed.dit_precision=fp8: the DiT's matrix products in fp8 for inference (utils/speed.py applies it).

Not one of the exact speed levers: fp8 rounds activations and weights to 3 mantissa bits, so it is a
precision a user asks for (docs/performance.md reports its error against bf16). Needs a GPU with fp8
arithmetic; torchao is imported only when it is asked for.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

FP8_CAPABILITY = (8, 9)  # Ada / Hopper and later: the first GPUs with fp8 arithmetic


def fp8_unsupported(device: torch.device) -> str | None:
    """Why fp8 arithmetic cannot run on `device`, or None where it can."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY:
        return None
    where = torch.cuda.get_device_name(device) if cuda else "a machine without CUDA" if device.type == "cuda" else device.type
    return f"a GPU with fp8 arithmetic (compute capability >= 8.9: Ada, Hopper or later), but this run is on {where}"


# The DiT block layers speed.dit_precision=fp8 leaves in bf16: the cross-attention's text keys and values,
# computed once per prompt into the cache that every step and chunk reads.
FP8_KEEP = ("attn2.to_k", "attn2.to_v")


def fp8_layers(dit: nn.Module) -> list[str]:
    """The names of the layers fp8_matmuls converts: the blocks' nn.Linear layers but FP8_KEEP."""
    return [name for name, m in dit.named_modules() if type(m) is nn.Linear and name.startswith("blocks.")
            and not name.endswith(FP8_KEEP)]


def fp8_matmuls(dit: nn.Module) -> list[str]:
    """speed.dit_precision=fp8 (inference): every linear layer of the DiT's blocks but FP8_KEEP runs in fp8,
    in place, through torchao's Float8DynamicActivationFloat8WeightConfig with per-row scales (e4m3 weights
    scaled per output row once; each call scales its activations per token, then one fp8 matrix product,
    torch._scaled_mm, with a bf16 output). The embeddings, the time projection and the output head stay
    bf16. Not exact: docs/performance.md reports the error against bf16. Returns the converted layers' names."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = fp8_layers(dit)
    if not names:
        raise ValueError(f"speed.dit_precision=fp8: {type(dit).__name__} has no linear layers under blocks.")
    chosen = set(names)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(dit, config, filter_fn=lambda m, name: name in chosen)
    log.info("speed.dit_precision=fp8: %d linear layers of the DiT's blocks in fp8 (per-row scales), %.2f B parameters",
             len(names), sum(p.numel() for p in dit.parameters()) / 1e9)
    return names
