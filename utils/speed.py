"""Inference speed levers: each one a config flag (`speed.*` in configs/inference.yaml), each exact.

Every lever leaves the outputs those of the plain path up to bf16 rounding (tests/test_speed.py on
the CPU, tests/test_speed_gpu.py on the GPU), and scripts/bench_inference.py measures each one.
`null` means "on when running on CUDA": the levers that exist only there raise a clear error when
set to true on another device instead of silently doing nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional

import torch

log = logging.getLogger(__name__)


@dataclass
class SpeedSchema:
    """configs/inference.yaml's `speed:` block; each key: null (on for CUDA) | true | false. The
    defaults are null for the levers that make inference faster (docs/performance.md), false otherwise."""

    cudnn_attention: Optional[bool] = False  # SDPA pinned to cuDNN's attention; off: torch already picks it
    fa4_attention: Optional[bool] = None  # FlashAttention-4 (pip install flash-attn-4) for self-attention; null: on where it runs
    compact_text: Optional[bool] = None  # cross-attention over each prompt's tokens + 3 rows for its padding (exact: log N key bias)
    fused_elementwise: Optional[bool] = None  # torch.compile the blocks' norms, modulation, RoPE, gated residuals
    cuda_graphs: Optional[bool] = None  # capture one CUDA graph per chunk position and replay it
    vae_channels_last: Optional[bool] = None  # channels-last 3-D convolutions in the VAE decoder
    vae_fused_norm: Optional[bool] = None  # torch.compile the VAE's RMS norm + SiLU (residual blocks, output heads)
    vae_stacked_conv: Optional[bool] = False  # the VAE decoder's 3-D convolutions as 2-D ones over stacked frames; off: slower, more memory
    cudnn_benchmark: Optional[bool] = None  # let cuDNN time its convolution algorithms once per shape
    vae_implicit_padding: Optional[bool] = None  # the VAE decoder's other convs (the full-resolution head) pad spatially themselves
    vae_fused_block: Optional[bool] = None  # the VAE decoder's residual blocks: bias + norm + SiLU and bias + residual compiled, lean memory
    vae_fused_upsample: Optional[bool] = None  # the VAE decoder's upsampling layers: frame pairs + 2x nearest + layout in one compiled gather
    decode_stream: Optional[bool] = None  # decode each chunk on a second CUDA stream while the DiT computes the next
    dit_precision: Optional[str] = "bf16"  # bf16 | fp8: the DiT blocks' matrix products in fp8 (not exact: docs/performance.md)


LEVERS = tuple(f.name for f in fields(SpeedSchema) if f.name != "dit_precision")  # the on / off levers
DIT_PRECISIONS = ("bf16", "fp8")
CUDA_ONLY = ("cudnn_attention", "fa4_attention", "cuda_graphs", "cudnn_benchmark", "decode_stream")


def resolve_levers(speed, device: torch.device, attention_backend: str = "sdpa") -> dict[str, bool]:
    """{lever: on?} from the config (a SpeedSchema, a DictConfig or a dict) for `device`, plus `dit_fp8`
    (speed.dit_precision=fp8: the one setting that is not exact, so it is a precision and not a lever).

    attention_backend is the model config's (before "auto" is resolved): the attention levers pick the
    kernel only where the config leaves it open ("sdpa" or "auto"), never over a named backend."""
    from model.wan.attention import fa4_supported

    values = {name: speed.get(name) if isinstance(speed, dict) else getattr(speed, name) for name in LEVERS}
    kernel_named = attention_backend not in ("sdpa", "auto")
    fa4_missing = fa4_supported(device)  # why FA4 cannot run here, or None
    levers = {}
    for name, value in values.items():
        if value is None:
            value = device.type == "cuda" and not (name in ("cudnn_attention", "fa4_attention") and kernel_named)
            if name == "fa4_attention" and value and fa4_missing:
                log.info("speed.fa4_attention=null: off, %s", fa4_missing)
                value = False
        elif value and name in CUDA_ONLY and device.type != "cuda":
            raise ValueError(f"speed.{name}=true needs a CUDA device, but inference runs on {device}; set it to false or null")
        elif value and name == "fa4_attention" and fa4_missing:
            raise ValueError(f"speed.fa4_attention=true, but {fa4_missing}; set it to false or null")
        levers[name] = bool(value)
    for name in ("cudnn_attention", "fa4_attention"):
        if levers[name] and kernel_named:
            raise ValueError(
                f"speed.{name}=true picks the attention kernel, but model.attention_backend={attention_backend}; "
                f"choose one: model.attention_backend=auto or speed.{name}=false"
            )
    if levers["cudnn_attention"] and levers["fa4_attention"]:  # one of them left null gives way
        if values["cudnn_attention"] is None:
            levers["cudnn_attention"] = False
        elif values["fa4_attention"] is None:
            levers["fa4_attention"] = False
    if levers["cudnn_attention"] and levers["fa4_attention"]:
        raise ValueError("speed.cudnn_attention and speed.fa4_attention both pick the attention kernel: set one of them to false")
    levers["dit_fp8"] = _dit_fp8(speed.get("dit_precision") if isinstance(speed, dict) else speed.dit_precision, device)
    return levers


def _dit_fp8(precision, device: torch.device) -> bool:
    from model.wan.fp8 import fp8_unsupported

    if precision is None or precision == "bf16":
        return False
    if precision != "fp8":
        raise ValueError(f"speed.dit_precision={precision}: expected one of {list(DIT_PRECISIONS)}")
    why = fp8_unsupported(device)
    if why:
        raise ValueError(f"speed.dit_precision=fp8 needs {why}; use bf16")
    return True


def apply_levers(generator, vae, levers: dict[str, bool]):
    """Switch the levers on the generator and the VAE; returns (runner, decode_stream): the callable
    the rollout calls (the generator or its CUDA graphs) and the stream chunks decode on (or None)."""
    from pipeline.cuda_graphs import ChunkGraphs

    if levers["cudnn_attention"]:
        generator.set_attention_backend("cudnn")
    if levers["fa4_attention"]:
        generator.set_attention_backend("fa4")  # FA4 for self-attention, cuDNN for the short cross-attention
    if levers.get("dit_fp8"):
        from model.wan.fp8 import fp8_matmuls

        fp8_matmuls(generator)  # in place: the generator's bf16 block weights are gone
    generator.set_fused_elementwise(levers["fused_elementwise"])
    generator.set_compact_text(levers["compact_text"])
    for lever, setter in (("vae_channels_last", "set_channels_last"), ("vae_fused_norm", "set_fused_norms"),
                          ("vae_stacked_conv", "set_stacked_convs"), ("vae_implicit_padding", "set_implicit_padding"),
                          ("vae_fused_block", "set_fused_blocks"), ("vae_fused_upsample", "set_fused_upsample")):
        if hasattr(vae, setter):
            getattr(vae, setter)(levers[lever])
        elif levers[lever]:
            raise ValueError(f"speed.{lever}=true, but {type(vae).__name__} is no convolutional VAE; set it to false")
    torch.backends.cudnn.benchmark = levers["cudnn_benchmark"]  # process-wide, as cuDNN's autotuner is
    # and time every algorithm cuDNN offers, not torch's default first 10: the fastest kernel for the
    # decoder's full-resolution 96-channel convolutions is past the 10th (docs/performance.md)
    torch.backends.cudnn.benchmark_limit = 0 if levers["cudnn_benchmark"] else 10
    runner = ChunkGraphs(generator) if levers["cuda_graphs"] else generator
    stream = torch.cuda.Stream(priority=-1) if levers["decode_stream"] else None  # high priority: frames out first
    log.info("speed levers: %s", ", ".join(f"{k}={'on' if v else 'off'}" for k, v in levers.items()))
    return runner, stream
