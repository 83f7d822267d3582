"""Attention for the Wan backbone: the block-causal pattern, its masks, and the kernels.

Three kernels serve three cases:
- unmasked attention (bidirectional clips, a KV-cache chunk over its visible past, cross-attention):
  SDPA by default (PyTorch picks its kernel), SDPA pinned to cuDNN's fused attention (a Hopper-tuned
  kernel, CUDA only), FlashAttention-4 (the flash-attn-4 package's CuTe kernels for Hopper and
  Blackwell, through its public `flash_attn.cute.flash_attn_func`; torch 2.11's own FA4 registration
  does not unpack what flash-attn-4 4.0.0b36 returns), or flash-attn (2)
  when it is installed and selected;
- the whole-clip block-causal mask: FlexAttention on CUDA (block-sparse, no dense mask), SDPA with
  a dense boolean mask on CPU, where FlexAttention has no backward.
Tensors are laid out [B, L, heads, head_dim] throughout, as diffusers' Wan attention does.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "cudnn", "flash_attn", "fa4")
# With "fa4", attention over fewer keys than this runs on cuDNN instead: FA4 loses on the
# cross-attention's 512 text tokens and wins on every self-attention of a Wan-1.3B chunk or clip
# (4,680 keys and more; scripts/bench_attention.py, numbers in docs/performance.md).
FA4_MIN_KEYS = 2048


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" is cuDNN's fused attention where it runs (CUDA, bf16 / fp16: faster training steps,
    docs/performance.md), else SDPA; any other name is returned as it is."""
    if backend != "auto":
        return backend
    return "cudnn" if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) else "sdpa"


@dataclass(frozen=True)
class CausalPattern:
    """Which frames a frame may attend to in the block-causal modes.

    Frames are grouped into blocks of `num_frame_per_block` (with `independent_first_frame`, frame 0
    is a block of its own and blocks of `num_frame_per_block` follow). A frame attends to every frame
    of its own block and of all earlier blocks; with `local_attn_size = W > 0`, only to the last W
    frames up to the end of its block, plus the first `sink_size` frames of the clip.
    """

    num_frame_per_block: int = 1
    independent_first_frame: bool = False
    local_attn_size: int = -1  # frames; -1 = all earlier blocks
    sink_size: int = 0  # frames at the clip start that stay visible with a local window

    def __post_init__(self):
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {self.num_frame_per_block}")
        if self.local_attn_size != -1 and self.local_attn_size < self.num_frame_per_block:
            raise ValueError(
                f"local_attn_size={self.local_attn_size} must be -1 (no window) or at least "
                f"num_frame_per_block={self.num_frame_per_block}: a block must see all of itself"
            )
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.sink_size and self.local_attn_size == -1:
            raise ValueError("sink_size > 0 needs a local window (local_attn_size > 0)")

    @property
    def windowed(self) -> bool:
        return self.local_attn_size != -1

    def block_start(self, frame: int) -> int:
        """The first frame of the block that holds `frame`."""
        if self.independent_first_frame:
            if frame == 0:
                return 0
            return 1 + (frame - 1) // self.num_frame_per_block * self.num_frame_per_block
        return frame // self.num_frame_per_block * self.num_frame_per_block

    def block_length(self, start: int) -> int:
        return 1 if (self.independent_first_frame and start == 0) else self.num_frame_per_block

    def check_clip(self, num_frames: int) -> None:
        first = 1 if self.independent_first_frame else 0
        if num_frames < 1 or (num_frames - first) % self.num_frame_per_block:
            what = "1 + a multiple of" if first else "a multiple of"
            raise ValueError(
                f"a block-causal clip of {num_frames} latent frames does not split into blocks: "
                f"expected {what} num_frame_per_block={self.num_frame_per_block}"
            )

    def check_chunk(self, frame_offset: int, num_frames: int) -> None:
        if frame_offset < 0 or self.block_start(frame_offset) != frame_offset or (
            num_frames != self.block_length(frame_offset)
        ):
            raise ValueError(
                f"a chunk of {num_frames} frames at frame offset {frame_offset} is not one block of "
                f"the pattern (num_frame_per_block={self.num_frame_per_block}, "
                f"independent_first_frame={self.independent_first_frame}): a chunk must start where a "
                f"block starts and hold exactly that block"
            )

    def frame_visibility(self, num_frames: int, device=None) -> torch.Tensor:
        """[F, F] bool, entry (q, k) true when frame q may attend to frame k."""
        self.check_clip(num_frames)
        frames = torch.arange(num_frames, device=device)
        ends = torch.tensor(
            [self.block_start(f) + self.block_length(self.block_start(f)) for f in range(num_frames)],
            device=device,
        )
        q_end, k = ends[:, None], frames[None, :]
        visible = k < q_end
        if self.windowed:
            visible &= (k >= q_end - self.local_attn_size) | (k < self.sink_size)
        return visible


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def flash_attn_available() -> bool:
    """flash-attn 2 (`flash_attn.flash_attn_func`); flash-attn-4 alone installs only `flash_attn.cute`."""
    return _has_module("flash_attn.flash_attn_interface")


def fa4_available() -> bool:
    return _has_module("flash_attn.cute")


_FA4_MISSING = "the flash-attn-4 package is not installed (pip install flash-attn-4)"


def fa4_supported(device: torch.device) -> str | None:
    """None if FlashAttention-4 can run on `device`, else why not."""
    if not fa4_available():
        return _FA4_MISSING
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"FlashAttention-4 runs on CUDA GPUs, not on {device}"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10):
        return f"FlashAttention-4 needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x), this one is {major}.x"
    return None


# FlashAttention-4 as one PyTorch op, so that selective activation checkpointing can keep its output
# (model.checkpoint_policy=save_attention names it) and torch.compile / CUDA graphs see one call.
@torch.library.custom_op("wan::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, H, D], log-sum-exp [B, H, Lq] float32) of unmasked attention; q, k, v: [B, L, H, D]."""
    from flash_attn.cute import flash_attn_func  # imported lazily: an optional dependency

    out, lse = flash_attn_func(q, k, v, return_lse=True)
    return out, lse


@fa4_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _fa4_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _fa4_backward(ctx, grad_out, _grad_lse):
    from flash_attn.cute.interface import _flash_attn_bwd  # the kernel flash-attn-4's own autograd calls

    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out.contiguous(), lse)[:3]
    return dq, dk, dv


fa4_attention.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def check_backend(backend: str, device: torch.device | None = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; expected one of {BACKENDS} (or 'auto' in the config)")
    if backend == "flash_attn" and not flash_attn_available():
        raise ValueError(
            "attention backend 'flash_attn' was selected but the flash_attn package is not installed; "
            "install flash-attn (a wheel matching your torch and CUDA) or select 'sdpa'"
        )
    if backend == "fa4":
        why = fa4_supported(device) if device is not None else (None if fa4_available() else _FA4_MISSING)
        if why:
            raise ValueError(f"attention backend 'fa4' was selected but {why}; select 'cudnn' or 'sdpa'")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Unmasked attention. q: [B, Lq, H, D], k, v: [B, Lk, H, D] -> [B, Lq, H, D]. bias: [B, Lk] added
    to every query's logits (a compacted text's, kv_cache.compact_text): SDPA picks its kernel then."""
    if bias is not None:
        mask = bias.to(q.dtype)[:, None, None, :]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    if backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func  # imported lazily: an optional dependency

        return flash_attn_func(q, k, v)
    if backend in ("cudnn", "fa4"):
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend {backend!r} runs on CUDA in bf16 / fp16, got a {q.dtype} tensor on {q.device}; "
                "select attention_backend=sdpa for this model"
            )
        if backend == "fa4" and k.shape[1] >= FA4_MIN_KEYS:
            return fa4_attention(q, k, v)[0]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # no fallback: an unsupported shape raises
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: CausalPattern, num_frames: int
) -> torch.Tensor:
    """Whole-clip block-causal attention. q, k, v: [B, F*T, H, D] in frame-major token order."""
    tokens_per_frame = q.shape[1] // num_frames
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        block_mask = _flex_block_mask(pattern, num_frames, tokens_per_frame, q.device)
        out = _compiled_flex_attention()(qt, kt, vt, block_mask=block_mask)
    else:
        visible = pattern.frame_visibility(num_frames, q.device)
        mask = visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(pattern: CausalPattern, num_frames: int, tokens_per_frame: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    visible = pattern.frame_visibility(num_frames, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible[q_idx // tokens_per_frame, kv_idx // tokens_per_frame]

    length = num_frames * tokens_per_frame
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
