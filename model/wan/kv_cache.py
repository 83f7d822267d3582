"""Static caches for chunk-by-chunk generation: self-attention K/V per layer, cross-attention K/V.

The self-attention cache is preallocated once for the longest clip (or for sink + window frames,
then it rolls) and all bookkeeping is in Python ints on the host, so a chunk call never syncs
with the device. Keys are stored after RoPE at their absolute frame positions, so evicting a frame
changes nothing for the frames that stay.

Slots: frame f lives in slot f, except with a local window, where the frames after the sink share
a ring of `local_attn_size` slots. Attention is a softmax over a *set* of keys, so the order of
slots does not matter; the ring holds exactly the sink plus the last `local_attn_size` frames up
to the end of the current chunk, which is the whole-clip block-causal window.

Two operations serve endless streams (engine/stream.py): `rewind` writes the latest frames again (a
prompt switch's re-cache: while they are rewritten, a chunk attends to the kept sink and the rewritten
frames only, not to the stale keys still in the ring), and `shift` renumbers the cached frames to lower
positions, rotating their keys by RoPE, so that positions (and the chunk positions CUDA graphs are
captured at) stay bounded however long the stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import CausalPattern
from .fused import apply_rope


@dataclass(frozen=True)
class ChunkPlan:
    """Where one chunk's tokens go in the cache and which slots it attends to (all in tokens)."""

    writes: tuple[tuple[int, int, int], ...]  # (slot start, chunk start, length)
    valid: int  # slots [0, valid) hold visible keys once the chunk is written
    others: tuple[tuple[int, int], ...]  # slot ranges in [0, valid) that hold other frames
    gather: bool = False  # a re-cache (KVCache.rewind): the chunk sees `others` and itself, not all of [0, valid)


class KVCache:
    """Per-layer self-attention K/V: k, v are [num_layers, B, capacity tokens, heads, head_dim]."""

    def __init__(
        self,
        pattern: CausalPattern,
        *,
        num_layers: int,
        batch_size: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        capacity_frames: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if pattern.windowed and capacity_frames != pattern.sink_size + pattern.local_attn_size:
            raise ValueError(
                f"a rolling cache holds sink_size + local_attn_size = "
                f"{pattern.sink_size + pattern.local_attn_size} frames, got capacity_frames={capacity_frames}"
            )
        if capacity_frames < 1:
            raise ValueError(f"capacity_frames must be >= 1, got {capacity_frames}")
        self.pattern = pattern
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        shape = (num_layers, batch_size, capacity_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.end_frame = 0  # frames [0, end_frame) have been written (some may have been evicted)
        self.generation = 0  # counts reset()s: views into the cache taken before one are stale after it
        self._replay: tuple[int, int] | None = None  # (first, end) frames being written again (rewind)
        self._sink_keys: torch.Tensor | None = None  # the sink's keys at their first positions (shift)
        self.shifted = 0  # frames the positions have been lowered by in all (shift)

    @classmethod
    def for_model(
        cls,
        model,
        pattern: CausalPattern,
        *,
        batch_size: int,
        latent_hw: tuple[int, int],
        max_frames: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "KVCache":
        """Size a cache from the model config and the latent video size.

        Without a local window it holds `max_frames` frames; with one it holds sink + window frames
        and rolls, so clips of any length fit.
        """
        cfg = model.config
        _, p_h, p_w = cfg.patch_size
        height, width = latent_hw
        if height % p_h or width % p_w:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p_h}x{p_w}")
        if pattern.windowed:
            capacity = pattern.sink_size + pattern.local_attn_size
        elif max_frames is None:
            raise ValueError("a cache without a local window needs max_frames (the longest clip, in latent frames)")
        else:
            capacity = max_frames
        param = next(model.parameters())
        return cls(
            pattern,
            num_layers=cfg.num_layers,
            batch_size=batch_size,
            tokens_per_frame=(height // p_h) * (width // p_w),
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            capacity_frames=capacity,
            dtype=dtype or getattr(model, "compute_dtype", param.dtype),
            device=device or param.device,
        )

    def reset(self) -> None:
        """Forget all frames (the memory is reused; stale slots are never read)."""
        self.end_frame = 0
        self.generation += 1
        self._replay, self._sink_keys, self.shifted = None, None, 0

    def first_held(self) -> int:
        """The first frame from which on every written frame is still in the cache (the sink aside)."""
        if not self.pattern.windowed:
            return 0
        return max(0, self.end_frame - self.pattern.local_attn_size)

    def rewind(self, frame: int) -> None:
        """Write frames [frame, end_frame) again, chunk by chunk in order (a prompt switch's re-cache).

        Until they are all written, a chunk attends to the frames before `frame` that the cache keeps
        for good (the sink with a window, all of them without) and to the rewritten frames up to its
        own end, not to the old keys of later frames still in their slots: as if the kept frames and
        the rewritten ones were the whole clip."""
        if self._replay is not None:
            raise RuntimeError(f"frames {self._replay} are still being rewritten; finish that first")
        if not self.first_held() <= frame <= self.end_frame or self.pattern.block_start(frame) != frame:
            raise ValueError(f"cannot rewind to frame {frame}: the cache holds frames [{self.first_held()}, "
                             f"{self.end_frame}) (and the sink) and a rewind starts where a block starts")
        if frame < self.end_frame:
            self._replay = (frame, self.end_frame)
            self.end_frame = frame

    def shift(self, frames: int, rope: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Renumber the cached frames f -> f - frames, for chunks that continue at the lowered positions.

        Keys are stored after RoPE, and attention depends on positions only through their differences,
        so rotating every cached key by the RoPE of -frames leaves what later chunks compute unchanged up
        to rounding. The ring's keys are rotated in place (each about once in its life); the sink's are
        rotated from a copy of their first values, so repeated shifts do not pile up rounding on them.
        `frames` is a multiple of the window, so every frame keeps its slot. rope(p) -> (cos, sin)
        [1, 1, head_dim / 2]: the rotation of frame position p (the model's RoPE, model/wan/fused.py
        layout)."""
        window, sink, t = self.pattern.local_attn_size, self.pattern.sink_size, self.tokens_per_frame
        if not self.pattern.windowed or frames <= 0 or frames % window:
            raise ValueError(f"shift by {frames} frames: needs a rolling window and a positive multiple of it ({window})")
        if self.end_frame - frames - window < sink or self._replay is not None:
            raise ValueError(f"shift by {frames} frames would move window frames [{self.end_frame - window}, "
                             f"{self.end_frame}) into the sink's {sink} frames (or a rewind is unfinished)")
        if sink and self._sink_keys is None:
            self._sink_keys = self.k[:, :, : sink * t].clone()
        self.shifted += frames
        cos, sin = rope(-frames)
        for layer in range(self.k.shape[0]):  # a frame at a time: no float32 copy of a whole layer's ring
            for slot in range(sink, sink + window):
                keys = self.k[layer, :, slot * t : (slot + 1) * t]
                keys.copy_(apply_rope(keys, cos, sin))
        if sink:
            cos, sin = rope(-self.shifted)
            for layer in range(self.k.shape[0]):
                self.k[layer, :, : sink * t] = apply_rope(self._sink_keys[layer], cos, sin)
        self.end_frame -= frames

    def _slot(self, frame: int) -> int:
        sink = self.pattern.sink_size
        if not self.pattern.windowed or frame < sink:
            return frame
        return sink + (frame - sink) % self.pattern.local_attn_size

    def plan(self, frame_offset: int, num_frames: int, batch_size: int, tokens_per_frame: int) -> ChunkPlan:
        """Check a chunk call against the cache, advance the bookkeeping and say where it goes."""
        if batch_size != self.batch_size or tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"the chunk has batch size {batch_size} and {tokens_per_frame} tokens per frame, but the "
                f"cache was built for {self.batch_size} and {self.tokens_per_frame}"
            )
        self.pattern.check_chunk(frame_offset, num_frames)
        end = frame_offset + num_frames
        if frame_offset > self.end_frame:
            raise ValueError(
                f"chunk at frame offset {frame_offset}, but the cache holds frames [0, {self.end_frame}): "
                f"chunks must come in order, without gaps"
            )
        if end < self.end_frame:
            raise ValueError(
                f"chunk [{frame_offset}, {end}) would rewrite frames before the cached frames "
                f"[{end}, {self.end_frame}); only the latest chunk can be run again (reset() to start over)"
            )
        if not self.pattern.windowed and end > self.capacity_frames:
            raise ValueError(
                f"chunk [{frame_offset}, {end}) is beyond the cache, which holds {self.capacity_frames} "
                f"frames: build the cache with max_frames >= {end}, or set local_attn_size to roll it"
            )
        self.end_frame = end
        t = self.tokens_per_frame
        writes: list[tuple[int, int, int]] = []
        for i in range(num_frames):  # merge consecutive slots into runs
            slot = self._slot(frame_offset + i)
            if writes and writes[-1][0] + writes[-1][2] == slot * t:
                s, c, n = writes[-1]
                writes[-1] = (s, c, n + t)
            else:
                writes.append((slot * t, i * t, t))
        if self._replay is not None:
            return self._replay_plan(frame_offset, end, tuple(writes))
        valid = min(end, self.capacity_frames) * t
        others, cursor = [], 0
        for s, _, n in sorted(writes):
            if s > cursor:
                others.append((cursor, s))
            cursor = s + n
        if cursor < valid:
            others.append((cursor, valid))
        return ChunkPlan(tuple(writes), valid, tuple(others))

    def _replay_plan(self, frame_offset: int, end: int, writes) -> ChunkPlan:
        """A chunk of a rewind: it sees the kept frames before the rewind and the rewritten ones up to `end`."""
        first, last = self._replay
        if end >= last:
            self._replay = None
        kept = min(self.pattern.sink_size, first) if self.pattern.windowed else first
        own = range(frame_offset, end)
        visible = [f for f in [*range(kept), *range(first, end)] if f not in own]
        if self.pattern.windowed:  # the window of the chunk (the rewritten frames lie inside it)
            visible = [f for f in visible if f >= end - self.pattern.local_attn_size or f < self.pattern.sink_size]
        t, others = self.tokens_per_frame, []
        for slot in sorted(self._slot(f) for f in visible):  # merge into runs of slots
            if others and others[-1][1] == slot * t:
                others[-1] = (others[-1][0], (slot + 1) * t)
            else:
                others.append((slot * t, (slot + 1) * t))
        valid = max([b for _, b in others] + [s + n for s, _, n in writes])
        return ChunkPlan(writes, valid, tuple(others), gather=True)

    def past(self, layer: int, plan: ChunkPlan, view: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys/values of the frames other than the chunk's own, as new tensors; view=True:
        as views of the cache where they are one run of slots that later chunks never rewrite (no
        local window: a slot per frame, chunks in order), else copies. Views hold only until reset()."""
        return cached_past(self.k[layer], self.v[layer], plan, view and not self.pattern.windowed)


def attend_cached(ck: torch.Tensor, cv: torch.Tensor, plan: ChunkPlan, k, v, past=None, write: bool = True):
    """One layer's cache buffers ck, cv [B, slots, H, D]: write the chunk's k, v and return what it attends to.

    Without grad, the chunk is written in place and the cache slice is returned (no copy).
    With grad, the cache gets a detached copy and the chunk's own tensors are concatenated to
    the other cached frames (`past`, gathered here unless given), so the graph never holds a
    cache buffer that later chunks overwrite. `write=False` is the recompute of a checkpoint.
    A function of the buffers, not of a layer index, so that one compiled block serves every layer.
    """
    if write:
        for slot, start, n in plan.writes:
            ck[:, slot : slot + n] = k[:, start : start + n].detach()
            cv[:, slot : slot + n] = v[:, start : start + n].detach()
    if write and past is None and not (k.requires_grad or v.requires_grad or plan.gather):
        return ck[:, : plan.valid], cv[:, : plan.valid]
    past_k, past_v = past if past is not None else cached_past(ck, cv, plan)
    return torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)


def cached_past(ck: torch.Tensor, cv: torch.Tensor, plan: ChunkPlan, view: bool = False):
    """The other frames' keys/values in one layer's buffers: views if `view` and they are one run of
    slots (the caller knows no later chunk rewrites them), else copies."""
    if view and len(plan.others) <= 1:
        a, b = plan.others[0] if plan.others else (0, 0)
        return ck[:, a:b], cv[:, a:b]
    ranges = plan.others or ((0, 0),)
    return torch.cat([ck[:, a:b] for a, b in ranges], 1), torch.cat([cv[:, a:b] for a, b in ranges], 1)


class CrossAttnCache:
    """Cross-attention K/V per layer, computed once per prompt batch and reused across chunks and steps.

    Entries are stored detached. They are reused when no gradient is wanted; a call with grad
    enabled recomputes them from the text so that the text projections still receive gradients.
    `reset()` keeps the memory: the next prompt batch of the same shape is copied into the same
    tensors, so work captured against their addresses (CUDA graphs) stays valid.
    """

    def __init__(self, num_layers: int):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.context: torch.Tensor | None = None  # the projected text, [B, L, dim]
        self.text_bias: torch.Tensor | None = None  # [B, L] logits added per key when the text is compacted
        self.filled = False

    def set_text_bias(self, bias: torch.Tensor | None) -> None:
        """The key bias of a compacted text (compact_text), or None for the text as it is."""
        self.text_bias = None if bias is None else _copy_into(self.text_bias, bias)

    def set_context(self, projected: torch.Tensor) -> None:
        self.context = _copy_into(self.context, projected)
        self.filled = True

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        old = self.kv[layer] or (None, None)
        self.kv[layer] = (_copy_into(old[0], k), _copy_into(old[1], v))

    def reset(self) -> None:
        self.filled = False


def _copy_into(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """value, written into `buffer` when that has its shape, dtype and device (else value itself)."""
    value = value.detach()
    if buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (value.shape, value.dtype, value.device):
        return buffer.copy_(value)
    return value


PAD_ROWS = 3  # rows that stand for a prompt's padding in a compacted text (the bias split, below)


def compact_text(context: torch.Tensor, bucket: int = 64) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The text with its padding folded into three rows, and the key bias that keeps the attention exact.

    Wan's text encoder zeroes every position past a prompt's tokens, and the cross-attention has no
    mask, so all of a prompt's N padding positions give the same key and value, and attending to them
    equals attending to one of them with its logit raised by log N. context [B, L, D] -> ([B, L', D]:
    each prompt's non-zero rows in order, then zero rows; [B, L'] bias: 0 for the prompt's rows, the
    padding's log N split over three zero rows, -inf for the rest). L' is the longest prompt plus the
    three rows, rounded up to `bucket` so that nearby prompt lengths share shapes (and CUDA graphs).
    log N is split as log N = log(e^b1 + e^b2 + e^b3) with each b rounded down to the bias's dtype
    (bfloat16 keeps 8 bits: a single row would be off by up to 1.6% of the padding's weight; the
    split leaves less than 3e-5 of it). None when no prompt has enough padding to gain from it.
    One host sync (the longest prompt), outside any loop."""
    batch, length, _ = context.shape
    if context.dtype not in (torch.float32, torch.bfloat16):
        return None
    real = context.ne(0).any(dim=-1)  # [B, L]
    counts = real.sum(dim=1)
    size = -(-(int(counts.max()) + PAD_ROWS) // bucket) * bucket
    if size >= length:
        return None
    order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)[:, :size]  # the prompt's rows first
    compact = torch.gather(context, 1, order[..., None].expand(-1, -1, context.shape[2]))
    slot = torch.arange(size, device=context.device)[None, :] - counts[:, None]  # 0, 1, 2: the padding's rows
    bias = torch.where(slot < 0, 0.0, float("-inf")).to(torch.float64)
    remaining = (length - counts).to(torch.float64)  # the padding's weight still to place
    for row in range(PAD_ROWS):
        b = _round_down(remaining.clamp_min(1e-300).log(), context.dtype)
        b = torch.where(remaining > 0, b, float("-inf"))
        remaining = remaining - torch.where(remaining > 0, b.exp(), 0.0)
        bias = torch.where(slot == row, b[:, None], bias)
    return compact, bias.to(context.dtype)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 x -> the largest value of `dtype` (float32 or bfloat16) not above it, as float64."""
    f = x.to(torch.float32)
    f = torch.where(f.double() > x, torch.nextafter(f, torch.full_like(f, float("-inf"))), f)
    if dtype == torch.bfloat16:  # keep the top 16 bits (towards zero), then one step down where that rose
        bits = f.view(torch.int32)
        t = (bits & -65536).view(torch.float32)
        f = torch.where(t > f, (bits & -65536).add(65536).view(torch.float32), t)
    return f.double()
