"""The block-causal rollout: one function for training (Self Forcing) and inference.

Chunk by chunk, the generator denoises its chunk through the step list (predict x0, re-noise to the
next step) with the KV cache holding the clean past; then the chunk's output, noised to
`context_noise`, runs once more to write the cache. Training differs only in two ways: each chunk
stops at an exit step (its x0 prediction is the output), and the exit step of chunks inside the
gradient window runs with grad. Everything else, earlier steps and context passes, runs without
grad. All bookkeeping is host-side Python: no device syncs inside the loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from model.schedule import FlowSchedule
from model.wan.attention import CausalPattern
from model.wan.kv_cache import CrossAttnCache, KVCache


@dataclass
class Rollout:
    video: torch.Tensor  # [B, F, C, H, W], the x0 output of every chunk
    grad_mask: torch.Tensor  # [F] bool: frames whose output carries gradient
    exit_steps: list[int]  # per chunk, the index into the step list that produced its output


def chunk_starts(pattern: CausalPattern, num_frames: int) -> list[int]:
    """Start frame of every chunk (= block) of a clip."""
    pattern.check_clip(num_frames)
    starts, f = [], 0
    while f < num_frames:
        starts.append(f)
        f += pattern.block_length(f)
    return starts


def draw_exit_steps(
    num_chunks: int, num_steps: int, *, same_step_across_blocks: bool, last_step_only: bool, rng: random.Random
) -> list[int]:
    """The exit step of each chunk (drawn on one rank, then broadcast by the caller)."""
    if last_step_only:
        return [num_steps - 1] * num_chunks
    if same_step_across_blocks:
        return [rng.randrange(num_steps)] * num_chunks
    return [rng.randrange(num_steps) for _ in range(num_chunks)]


def rollout(
    generator: torch.nn.Module,
    noise: torch.Tensor,
    context: torch.Tensor,
    steps: Sequence[float],
    pattern: CausalPattern,
    *,
    schedule: FlowSchedule,
    exit_steps: Sequence[int] | None = None,
    grad_from_frame: int | None = None,
    context_noise: float = 0.0,
    rng=None,
    kv_cache: KVCache | None = None,
    crossattn_cache: CrossAttnCache | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    keep_cache: bool = False,
) -> Rollout:
    """Generate a clip chunk by chunk.

    noise: [B, F, C, H, W] initial noise; context: text embeddings [B, L, D]; steps: timesteps
    (already warped), decreasing. exit_steps: per chunk, the step whose x0 is the output (None: the
    last step, i.e. inference). grad_from_frame: None runs everything without grad; an int runs the
    exit step of every chunk that starts at or after that frame with grad (gradient truncation).
    rng: draws the re-noising noise (a SampleRNG, a torch.Generator or None). on_chunk(start, x0) streams each finished chunk (for decoding).
    keep_cache: also write the last chunk into the cache (to continue the clip later).
    """
    batch, num_frames, _, height, width = noise.shape
    starts = chunk_starts(pattern, num_frames)
    exit_steps = list(exit_steps) if exit_steps is not None else [len(steps) - 1] * len(starts)
    if len(exit_steps) != len(starts) or not all(0 <= e < len(steps) for e in exit_steps):
        raise ValueError(f"exit_steps must hold one index in [0, {len(steps)}) per chunk ({len(starts)}), got {exit_steps}")
    if kv_cache is None:
        kv_cache = KVCache.for_model(generator, pattern, batch_size=batch, latent_hw=(height, width), max_frames=num_frames)
    if crossattn_cache is None:
        crossattn_cache = CrossAttnCache(generator.config.num_layers)

    def denoise(x, t, start):  # one generator call: x0 prediction for the chunk
        return denoise_chunk(generator, x, t, context, start, schedule=schedule, kv_cache=kv_cache,
                             crossattn_cache=crossattn_cache)

    outputs, grad_mask = [], torch.zeros(num_frames, dtype=torch.bool)
    for chunk, start in enumerate(starts):
        n = pattern.block_length(start)
        with_grad = grad_from_frame is not None and start >= grad_from_frame
        x0 = denoise_steps(lambda x, t: denoise(x, t, start), noise[:, start : start + n], steps, schedule=schedule,
                           rng=rng, exit_step=exit_steps[chunk], with_grad=with_grad)
        grad_mask[start : start + n] = with_grad
        outputs.append(x0)
        if on_chunk is not None:
            on_chunk(start, x0.detach())
        if start != starts[-1] or keep_cache:  # the context pass: write the clean chunk into the cache
            write_context(generator, x0, context, start, schedule=schedule, context_noise=context_noise, rng=rng,
                          kv_cache=kv_cache, crossattn_cache=crossattn_cache)
    return Rollout(torch.cat(outputs, dim=1), grad_mask, exit_steps)


def denoise_steps(denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, steps: Sequence[float], *,
                  schedule: FlowSchedule, rng, exit_step: int | None = None, with_grad: bool = False) -> torch.Tensor:
    """One chunk through the step list: denoise(x, t) predicts x0, which is re-noised to the next step, until
    `exit_step` (None: the last step), whose x0 is returned (with grad when `with_grad` and grad is enabled).
    The loop of `rollout` and of a stream (engine/stream.py), so both draw the same noise in the same order.
    The re-noising is the schedule's (model/schedule.py next_state): fresh noise, or the noise x and x0 imply."""
    exit_step = len(steps) - 1 if exit_step is None else exit_step
    for i in range(exit_step):  # steps before the exit: no grad, re-noise to the next step
        with torch.no_grad():
            x0 = denoise(x, steps[i])
        x = schedule.next_state(x, x0, steps[i], steps[i + 1], lambda: _randn_like(x0, rng))
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return denoise(x, steps[exit_step])


def denoise_chunk(generator, x: torch.Tensor, t, context: torch.Tensor, start: int, *, schedule: FlowSchedule,
                  kv_cache: KVCache, crossattn_cache: CrossAttnCache) -> torch.Tensor:
    """One generator call on the chunk x [B, n, C, H, W] starting at frame `start`: its x0 prediction.

    t: a float (one timestep for the chunk) or a [B, n] tensor (per sample and frame)."""
    timestep = t if torch.is_tensor(t) else torch.full(x.shape[:2], t, device=x.device, dtype=torch.float32)
    flow = generator(x, timestep, context, kv_cache=kv_cache, frame_offset=start, crossattn_cache=crossattn_cache)
    return schedule.x0_from_flow(x, flow, timestep if torch.is_tensor(t) else t)


@torch.no_grad()
def write_context(generator, clean: torch.Tensor, context: torch.Tensor, start: int, *, schedule: FlowSchedule,
                  context_noise: float, rng, kv_cache: KVCache, crossattn_cache: CrossAttnCache) -> None:
    """The context pass: the finished chunk `clean`, noised to `context_noise`, runs once to write
    its keys and values into the cache, so that later chunks attend to it (rollout, teacher forcing)."""
    clean = clean.detach()
    if context_noise > 0:
        clean = schedule.add_noise(clean, _randn_like(clean, rng), context_noise)
    denoise_chunk(generator, clean, float(context_noise), context, start, schedule=schedule, kv_cache=kv_cache,
                  crossattn_cache=crossattn_cache)


def _randn_like(x: torch.Tensor, rng) -> torch.Tensor:
    if hasattr(rng, "randn_like"):  # a SampleRNG: per-sample streams
        return rng.randn_like(x)
    return torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)
