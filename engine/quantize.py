"""Frozen networks in lower precision: `model.precision.<network>` = null | bf16 | int8 | fp8.

- null: the network as before (a Wan teacher in model.dtype, the text encoder in its own dtype).
- bf16: every parameter and buffer cast to bfloat16.
- int8 / fp8: torchao's weight-only quantisation of every nn.Linear (Int8WeightOnlyConfig: symmetric
  int8 per output row with an fp32 scale; Float8WeightOnlyConfig: e4m3 per row). Everything else
  (norms, modulation tables, the patch embedding, embeddings) keeps its dtype and the activations stay
  in it: the layer multiplies by its dequantised weight. This project imports torchao only here, and
  only when int8 or fp8 is asked for (transformers and peft import it themselves when it is installed).
  fp8 needs a GPU with fp8 arithmetic (compute capability 8.9+).

Only frozen networks: a quantised weight takes no AdamW step (torchao's Int8Tensor is not a float
parameter), so asking it for a trained network is an error naming the key. To train on a budget,
train LoRA adapters (model.lora.<network>) over a frozen base instead. A quantised LoRA base for the
critic (QLoRA-style) is not offered: the critic is the 1.3B student's size in every config here, even
beside a 14B teacher (its frozen base: 5.2 GB as the fp32 weights trained networks keep, 1.3 GB in
int8), a few GB of a step that peaks at tens, while the rounding would enter the critic's own training
signal (its flow-matching loss backpropagates through the base) and FSDP2 could no longer shard it.

A quantised network is not sharded: FSDP2 cannot split torchao's Int8Tensor (it has no aten.split),
so each rank holds the whole int8 network. That is the single-GPU budget case int8 is for (a 14B
teacher: 28 GB in bf16, 14 GB in int8); over N GPUs a bf16 teacher sharded by FSDP costs 28 / N GB.

A network without linear layers but with a weight matrix of its own declares `round_weights(fn)` and
passes that matrix through `fn` (the values it would hold at the precision): the toy world's exact
teacher, whose templates are the matrix of its two products, so the toy shows what int8 does to a
teacher whose answer is known.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from model.wan.fp8 import fp8_unsupported  # the capability check, shared with inference's fp8 DiT

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "int8", "fp8")


def is_quantized(precision: str | None) -> bool:
    """int8 / fp8: torchao's weights, which FSDP2 cannot shard."""
    return precision in ("int8", "fp8")


def check_precision(name: str, precision: str | None, trained: bool, device: torch.device | None = None) -> None:
    """A precision a network cannot take, as one line naming the key, before anything is built
    (device None: all but the fp8 check, which needs the run's device)."""
    if precision is None:
        return
    key = f"model.precision.{name}={precision}"
    if precision not in PRECISIONS:
        raise ValueError(f"{key}: expected one of {list(PRECISIONS)} or null")
    if trained:
        raise ValueError(f"{key}: the {name} trains, so it keeps fp32 master weights (a quantised weight takes no "
                         f"AdamW step); set the precision of frozen networks only (the teacher, the text encoder), "
                         f"and train LoRA adapters over a frozen base with model.lora.{name}.rank")
    if precision == "fp8" and device is not None:
        why = fp8_unsupported(device)
        if why:
            raise ValueError(f"{key} needs {why}; use int8 or bf16")


def _torchao_config(precision: str):
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global flags, and the
    # trained networks' compiled blocks must compile as they do without a quantised teacher
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    if precision == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def quantize_linear(layer: nn.Linear, precision: str) -> None:
    """One linear layer's weight to torchao's int8 / fp8 tensor, in place."""
    from torchao.quantization import quantize_

    quantize_(layer, _torchao_config(precision))


def round_trip(precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(w [rows, cols]) -> the values w holds at `precision` (per row, as a linear layer's weight), in w's dtype."""
    if precision == "bf16":
        return lambda w: w.to(torch.bfloat16).to(w.dtype)

    def fn(w: torch.Tensor) -> torch.Tensor:
        with torch.device("meta"):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight = nn.Parameter(w.float(), requires_grad=False)  # torchao quantises float32 / bf16 weights
        quantize_linear(layer, precision)
        return layer.weight.dequantize().to(w.dtype)

    return fn


def linear_layers(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def set_precision(module: nn.Module, name: str, precision: str) -> nn.Module:
    """Store the frozen `module` at `precision`, in place; returns it."""
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"model.precision.{name}={precision}: the {name} has trainable parameters; only frozen "
                         "networks are stored in lower precision")
    if hasattr(module, "round_weights"):
        module.round_weights(round_trip(precision))
    elif precision == "bf16":
        module.to(torch.bfloat16)
    else:
        layers = linear_layers(module)
        if not layers:
            raise ValueError(f"model.precision.{name}={precision}: the {name} ({type(module).__name__}) has no linear "
                             "layers to quantise; use bf16 or null")
        for layer in layers:
            quantize_linear(layer, precision)
    log_precision(module, name, precision)
    return module


def log_precision(module: nn.Module, name: str, precision: str) -> None:
    if hasattr(module, "round_weights"):
        log.info("%s: weights rounded as %s stores them (%s.round_weights)", name, precision, type(module).__name__)
        return
    log.info("%s: %s weights, %.2f GiB%s", name, precision, weight_bytes(module) / 2**30,
             " (torchao, weight-only; not sharded: one copy per rank)" if is_quantized(precision) else "")


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers hold (quantised tensors: their int8 / fp8 data and scales)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total
