"""Streams: endless, steerable video from a trained student, one chunk at a time.

    stream = Stream(student, "a red car driving through a city at night", seed=0)
    for chunk in stream:          # chunk.frames [F, H, W, 3] uint8 on the host, chunk.timestamps [F] seconds
        show(chunk.frames)
        if typed: stream.switch(new_prompt)      # from the next chunk not yet started
        if done: break                           # or stream.stop(); the caches are freed

Each chunk runs the rollout's own loop (pipeline.rollout.denoise_steps, write_context) on the student's
runner (CUDA graphs where on) and goes through the VAE's stream decoder (on the student's decode stream
where on). Memory stays flat for any length:
- the self-attention cache is a rolling window of `window` latent frames plus a sink of the first
  `sink` frames;
- once a chunk would start at sink + 2 windows, every cached frame is renumbered a window lower
  (KVCache.shift), so RoPE positions stay below rope_max_seq_len and the chunk positions that CUDA
  graphs were captured at come round again instead of new ones being captured forever;
- the VAE decoder's feature cache holds its causal convolutions' last frames only;
- the stream keeps the latents of the last window (for a re-cache), not the video.

Prompt switches follow LongLive (Yang et al. 2025, "LongLive: Real-time Interactive Long Video
Generation"): the cross-attention cache is refilled with the new prompt and, with `recache`, the
self-attention cache of the window is recomputed from the latents already generated, under the new
prompt (KVCache.rewind: each chunk of the window attends to the kept sink and to the window's chunks up
to its own, at context_noise as a context pass), so the motion carries over and the new prompt takes
hold; without it only the cross-attention changes.

Continuation: `init_video` (pixels, encoded by the VAE), `init_image` (a still clip of one block) or
`init_latents` are written into the cache as clean context, chunk by chunk as a generated chunk's
context pass is, and decoded as the stream's first chunk (`Chunk.context`), so the video goes on from
them.

Noise: with `num_frames` (a known length) the stream draws what engine.inference.generate draws for
the same key (the whole clip's noise at the start, then the rollout's re-noising in order), so without
switches it gives that clip exactly. Without it (endless), each chunk draws from generators keyed by
(key, chunk start): nothing grows with length, and a stream continued from another's first chunks
repeats the rest of it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from model.wan.attention import CausalPattern
from model.wan.kv_cache import CrossAttnCache, KVCache, compact_text
from pipeline.cuda_graphs import ChunkGraphs
from pipeline.rollout import chunk_starts, denoise_chunk, denoise_steps, write_context
from engine.evaluation import EVAL_PHASE, EVAL_STEP
from utils.sample_rng import SampleRNG, mix_seed

log = logging.getLogger(__name__)


@dataclass
class StreamSchema:
    """configs/inference.yaml's `stream:` block (each key commented there)."""

    window: Optional[int] = None  # latent frames of the rolling window; null: the checkpoint's local_attn_size, else num_training_frames
    sink: Optional[int] = None  # latent frames at the start that stay visible; null: the checkpoint's sink_size
    recache: bool = True  # on a switch, recompute the window's self-attention cache under the new prompt
    lookahead: Optional[int] = None  # chunks started before the one returned; null: 1 on CUDA, 0 elsewhere


@dataclass
class Chunk:
    """Decoded frames of one chunk, on the host, and where they sit in the stream."""

    frames: torch.Tensor  # [F, H, W, 3] uint8
    timestamps: torch.Tensor  # [F] float64 seconds from the stream's first frame
    first_frame: int  # index of frames[0] among the stream's frames
    latent_start: int  # first latent frame of the chunk
    latents: torch.Tensor  # [n, C, h, w] the chunk's latents (on the generator's device)
    prompt: str  # the prompt it was generated (or, for context, written) under
    context: bool = False  # given frames (init_video / init_image / init_latents), not generated


@dataclass
class _Launched:
    chunk: Chunk
    ready: Optional[torch.cuda.Event]  # the host copy's event on CUDA; None: the frames are there


def default_key(seed: int) -> int:
    """The noise key of inference.py's first item with this seed (engine/inference.py Item.noise_key)."""
    return mix_seed(seed, EVAL_STEP, EVAL_PHASE, 0)


def stream_pattern(student, settings: StreamSchema) -> CausalPattern:
    """The student's block pattern with the stream's window and sink (stream.window / stream.sink)."""
    cfg = student.cfg
    n = cfg.num_frame_per_block
    window = settings.window if settings.window is not None else (
        cfg.local_attn_size if cfg.local_attn_size != -1 else cfg.num_training_frames)
    sink = settings.sink if settings.sink is not None else cfg.sink_size
    if isinstance(window, bool) or not isinstance(window, int) or window < n or window % n:
        raise ValueError(f"stream.window={window} must be a positive multiple of num_frame_per_block={n} (latent frames): "
                         "a re-cache and the renumbering of positions move whole blocks")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"stream.sink={sink} must be a whole number of latent frames >= 0")
    return CausalPattern(n, cfg.independent_first_frame, window, sink)


def shift_threshold(pattern: CausalPattern) -> int:
    """The first block start at or past sink + 2 windows: a chunk there is moved a window lower."""
    frame, limit = 0, pattern.sink_size + 2 * pattern.local_attn_size
    while frame < limit:
        frame += pattern.block_length(frame)
    return frame


class StreamCaches:
    """The memory streams run in: the self-attention cache and one cross-attention cache per text length
    (prompts compacted to other lengths keep their own, so CUDA graphs captured against each stay valid).
    Pass one to consecutive streams (inference.py does) so that they reuse it and its graphs; a new stream
    takes it over from the one before."""

    def __init__(self):
        self.key, self.kv, self.cross, self.owner = None, None, {}, None

    def take(self, owner, student, pattern: CausalPattern, latent_hw) -> KVCache:
        key = (id(student.generator), pattern, tuple(latent_hw))
        if key != self.key:
            self.release(student)
            self.kv = KVCache.for_model(student.generator, pattern, batch_size=1, latent_hw=latent_hw)
            self.key = key
        self.kv.reset()
        for cache in self.cross.values():
            cache.reset()
        self.owner = owner
        return self.kv

    def cross_cache(self, length: int, num_layers: int) -> CrossAttnCache:
        if length not in self.cross:
            self.cross[length] = CrossAttnCache(num_layers)
        return self.cross[length]

    def release(self, student) -> None:
        """Free the caches and the CUDA graphs captured against them."""
        if self.kv is not None and isinstance(student.runner, ChunkGraphs):
            student.runner.forget(self.kv)
        self.key, self.kv, self.cross, self.owner = None, None, {}, None


class Stream:
    """Chunks of one video, generated as they are asked for; see the module docstring.

    student: engine.student.Student (or any RolloutParts with runner, vae, decode_stream). prompt: the
    first prompt. seed: picks `key` when that is None (inference.py's first item of this seed). settings:
    window, sink, recache, lookahead. fps: for the timestamps. num_frames: generated latent frames when
    the length is known (then the noise is generate's, and the stream ends there); None: endless.
    init_video [F, 3, H, W] in [-1, 1], init_image [3, H, W] in [-1, 1] or init_latents [f, C, h, w]:
    frames to continue. caches: StreamCaches shared with earlier streams (None: its own)."""

    def __init__(self, student, prompt: str, seed: int = 0, *, settings: StreamSchema | None = None, fps: float = 16,
                 num_frames: int | None = None, init_video: torch.Tensor | None = None,
                 init_image: torch.Tensor | None = None, init_latents: torch.Tensor | None = None,
                 key: int | None = None, caches: StreamCaches | None = None):
        settings = settings or StreamSchema()
        self.student, self.fps, self.recache = student, fps, settings.recache
        self.device = student.device
        self.pattern = stream_pattern(student, settings)
        self.threshold = shift_threshold(self.pattern)
        rope_limit = student.generator.config.rope_max_seq_len
        if self.threshold > rope_limit:  # chunks end at position `threshold` at the most
            raise ValueError(f"stream.window={self.pattern.local_attn_size} and stream.sink={self.pattern.sink_size} put "
                             f"positions up to {self.threshold}, past the backbone's rope_max_seq_len={rope_limit}: "
                             "choose a shorter window or sink")
        lookahead = settings.lookahead if settings.lookahead is not None else int(self.device.type == "cuda")
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"stream.lookahead={settings.lookahead} must be an int >= 0 (or null)")
        self.lookahead = lookahead
        self.key = key if key is not None else default_key(seed)
        self.temporal_compression = student.vae.temporal_compression
        self._check_prompt(prompt)
        context = context_latents(student, self.pattern, video=init_video, image=init_image, latents=init_latents)
        self.context_frames = 0 if context is None else context.shape[1]
        if num_frames is not None:
            if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
                raise ValueError(f"num_frames={num_frames} must be a positive number of latent frames (or None: endless)")
            try:
                self.pattern.check_clip(self.context_frames + num_frames)
            except ValueError as e:
                raise ValueError(f"num_frames={num_frames} after {self.context_frames} context frames: {e}") from None
        self.end = None if num_frames is None else self.context_frames + num_frames  # latent frames, or endless

        self._owns_caches = caches is None
        self.caches = caches or StreamCaches()
        self.kv = self.caches.take(self, student, self.pattern, student.latent_shape[-2:])
        self.decoder = student.vae.stream_decoder(1)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.offset = 0  # latent frames the model's positions lag behind the stream's (KVCache.shift)
        self.frame = 0  # the next latent frame to start
        self.pixels = 0  # pixel frames started so far
        self.switches: list[tuple[int, str, bool]] = []  # (latent frame, prompt, recache) of each switch made
        self._window: deque[tuple[int, torch.Tensor]] = deque()  # (start, latents [1, n, C, h, w]) of the last window
        self._pending = None  # (start, latents, rng) of the chunk whose context pass is still to write
        self._scheduled: dict[int, tuple[str, bool]] = {}  # chunk start -> (prompt, recache)
        self._queue: deque[_Launched] = deque()
        self._stopped = False
        self._noise = None
        if self.end is not None:  # generate's draws: the whole clip's noise first, then the rollout's
            self._rng = SampleRNG([self.key], self.device)
            self._noise = self._rng.randn((1, num_frames, *student.latent_shape))
        self._set_prompt(prompt)
        if context is not None:
            self._write_context_frames(context)

    # ------------------------------------------------------------------ the user's side
    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        if self._stopped:
            raise StopIteration
        while len(self._queue) <= self.lookahead and (self.end is None or self.frame < self.end):
            self._launch()
        if not self._queue:
            self.stop()
            raise StopIteration
        launched = self._queue.popleft()
        if launched.ready is not None:
            launched.ready.synchronize()
        return launched.chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def switch(self, prompt: str, recache: bool | None = None, at: int | None = None) -> float:
        """Change the prompt from the next chunk not yet started (with lookahead 1, the one after the next
        returned), or from the chunk starting at latent frame `at`. recache: None takes the stream's
        setting. Returns the time (seconds) of the first frame made under the new prompt. A later switch
        for the same chunk replaces an earlier one."""
        self._check_prompt(prompt)
        if self._stopped or (self.end is not None and self.frame >= self.end):
            raise ValueError("the stream has ended: no chunk is left to switch the prompt of")
        if at is not None and (at < self.frame or self.pattern.block_start(at) != at or (self.end is not None and at >= self.end)):
            raise ValueError(f"a switch at latent frame {at}: expected a chunk start not yet started (>= {self.frame})"
                             + (f" and before the end ({self.end})" if self.end is not None else ""))
        self._scheduled[self.frame if at is None else at] = (prompt, self.recache if recache is None else bool(recache))
        return self.time_of(self.frame if at is None else at)

    def stop(self) -> None:
        """End the stream now; chunks started but not returned are dropped and its memory is freed."""
        self._stopped = True
        self._queue.clear()
        self._window.clear()
        self._pending = self._noise = None
        if self.caches.owner is self:
            self.caches.owner = None
            if self._owns_caches:
                self.caches.release(self.student)
        self.kv = None

    def time_of(self, latent_frame: int) -> float:
        """Seconds of the first pixel frame that latent frame decodes to."""
        return self.pixel_index(latent_frame) / self.fps

    def pixel_index(self, latent_frame: int) -> int:
        return 0 if latent_frame == 0 else 1 + self.temporal_compression * (latent_frame - 1)

    # ------------------------------------------------------------------ generation
    def _launch(self) -> None:
        """Start the next chunk: its context pass before, then its steps, decode and copy to the host."""
        if self.caches.owner is not self:
            raise RuntimeError("a newer stream took over this stream's caches (StreamCaches): one stream at a time")
        self._flush_context()
        if self.frame - self.offset >= self.threshold:  # renumber a window lower: positions stay bounded
            self.kv.shift(self.pattern.local_attn_size, self._rope)
            self.offset += self.pattern.local_attn_size
        switch = self._scheduled.pop(self.frame, None)
        if switch is not None:
            self._apply_switch(*switch)
        start = self.frame
        n = self.pattern.block_length(start)
        if self.end is None:
            rng = SampleRNG([mix_seed(self.key, "chunk", start)], self.device)
            noise = rng.randn((1, n, *self.student.latent_shape))
        else:
            rng, i = self._rng, start - self.context_frames
            noise = self._noise[:, i : i + n]
        s = self.student
        x0 = denoise_steps(lambda x, t: denoise_chunk(s.runner, x, t, self._text, start - self.offset, schedule=s.schedule,
                                                      kv_cache=self.kv, crossattn_cache=self._cross),
                           noise, s.steps, schedule=s.schedule, rng=rng)
        self._pending = (start, x0, rng)
        self._remember(start, x0)
        self.frame = start + n
        self._queue.append(self._decode(start, x0, context=False))

    def _flush_context(self) -> None:
        """The context pass of the last chunk, under the prompt it was made with (as the rollout writes it)."""
        if self._pending is None:
            return
        start, x0, rng = self._pending
        self._pending = None
        if self.end is None:
            rng = SampleRNG([mix_seed(self.key, "context", start)], self.device)
        self._write(self.student.runner, x0, start, rng)

    def _write(self, generator, latents: torch.Tensor, start: int, rng) -> None:
        s = self.student
        write_context(generator, latents, self._text, start - self.offset, schedule=s.schedule,
                      context_noise=s.cfg.context_noise, rng=rng, kv_cache=self.kv, crossattn_cache=self._cross)

    def _remember(self, start: int, latents: torch.Tensor) -> None:
        """Keep the latents of the chunks a re-cache would recompute: those inside the last window."""
        self._window.append((start, latents))
        end = start + latents.shape[1]
        while self._window and self._window[0][0] < end - self.pattern.local_attn_size:
            self._window.popleft()

    def _rope(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.generator._rope(position, 1, 1, 1, self.device)

    # ------------------------------------------------------------------ prompts
    def _check_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"a stream's prompt must be a non-empty string, got {prompt!r}")
        if hasattr(self.student.text_encoder, "check_prompts"):
            self.student.text_encoder.check_prompts([prompt])

    def _set_prompt(self, prompt: str) -> None:
        """Encode the prompt and pick its cross-attention cache (reset: the next chunk call fills it)."""
        text = self.student.encode([prompt])
        generator = self.student.generator
        packed = compact_text(text, generator.compact_text_bucket) if generator.compact_text else None
        length = text.shape[1] if packed is None else packed[0].shape[1]
        self._cross = self.caches.cross_cache(length, generator.config.num_layers)
        self._cross.reset()
        self._text, self.prompt = text, prompt

    def _apply_switch(self, prompt: str, recache: bool) -> None:
        self._set_prompt(prompt)
        self.switches.append((self.frame, prompt, recache))
        if recache and self.frame > 0:
            self._recache()

    def _recache(self) -> None:
        """Recompute the self-attention cache of the window from its latents under the current prompt.

        Eager calls (not CUDA graphs: their plans differ from the captured ones), keyed re-noising draws
        so that the stream's own draws are not shifted."""
        first = self.kv.first_held()
        self.kv.rewind(first)
        for start, latents in self._window:
            if start - self.offset >= first:
                rng = SampleRNG([mix_seed(self.key, "recache", len(self.switches), start)], self.device)
                self._write(self.student.generator, latents, start, rng)
        if self.kv.end_frame != self.frame - self.offset:
            raise RuntimeError(f"the re-cache rewrote frames up to {self.kv.end_frame + self.offset}, expected {self.frame}")

    # ------------------------------------------------------------------ continuation
    def _write_context_frames(self, latents: torch.Tensor) -> None:
        """Write the given frames into the cache as clean context, chunk by chunk, and decode them."""
        for start in chunk_starts(self.pattern, latents.shape[1]):
            chunk = latents[:, start : start + self.pattern.block_length(start)]
            self._write(self.student.runner, chunk, start, SampleRNG([mix_seed(self.key, "context", start)], self.device))
            self._remember(start, chunk)
        self.frame = latents.shape[1]
        self._queue.append(self._decode(0, latents, context=True))

    # ------------------------------------------------------------------ decoding
    def _decode(self, start: int, latents: torch.Tensor, context: bool) -> _Launched:
        """Decode a chunk (on the decode stream where there is one), as uint8, and copy it to the host."""
        side = self.student.decode_stream
        if side is None:
            frames = _to_uint8(self.decoder.decode(latents))
        else:
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                frames = _to_uint8(self.decoder.decode(latents))
            latents.record_stream(side)
        ready = None
        if frames.is_cuda:
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            self._copy_stream.wait_stream(side or torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                host.copy_(frames, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            frames.record_stream(self._copy_stream)
            frames = host
        first, count = self.pixels, frames.shape[0]
        expected = self.pixel_index(start + latents.shape[1]) - self.pixel_index(start)
        if count != expected:
            raise RuntimeError(f"the decoder gave {count} frames for latent frames [{start}, {start + latents.shape[1]}), "
                               f"expected {expected}: the VAE's temporal_compression disagrees with its decoder")
        self.pixels += count
        stamps = torch.arange(first, first + count, dtype=torch.float64) / self.fps
        return _Launched(Chunk(frames, stamps, first, start, latents[0], self.prompt, context), ready)


def context_latents(student, pattern: CausalPattern, *, video: torch.Tensor | None = None, image: torch.Tensor | None = None,
                    latents: torch.Tensor | None = None) -> torch.Tensor | None:
    """The frames a stream continues, as latents [1, f, C, h, w] of whole blocks on the student's device.

    video [F, 3, H, W] in [-1, 1]: its last frames, as many whole blocks as fit in them and in the window,
    encoded by the VAE; image [3, H, W]: a still clip of the first block's length (1 + temporal_compression
    * (n - 1) copies); latents [f, C, h, w]: as given, f a whole number of blocks. At most one of them."""
    given = [name for name, x in (("init_video", video), ("init_image", image), ("init_latents", latents)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"give one of init_video, init_image and init_latents, not {' and '.join(given)}")
    shape, device = tuple(student.latent_shape), student.device
    if latents is not None:
        latents = latents[None] if latents.ndim == 4 else latents
        if latents.ndim != 5 or latents.shape[0] != 1 or tuple(latents.shape[2:]) != shape:
            raise ValueError(f"init_latents must be [f, {', '.join(map(str, shape))}], got {tuple(latents.shape)}")
        try:
            pattern.check_clip(latents.shape[1])
        except ValueError as e:
            raise ValueError(f"init_latents: {e}") from None
        return latents.to(device, torch.float32)
    if video is None and image is None:
        return None
    vae = student.vae
    tc, size = vae.temporal_compression, (shape[1] * vae.spatial_compression, shape[2] * vae.spatial_compression)
    what = "init_image" if image is not None else "init_video"
    pixels = image[None] if image is not None and image.ndim == 3 else (image if image is not None else video)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"{what} must be {'[3, H, W]' if image is not None else '[F, 3, H, W]'} pixels in [-1, 1], "
                         f"got {tuple(image.shape if image is not None else video.shape)}")
    if tuple(pixels.shape[-2:]) != size:
        raise ValueError(f"{what} is {pixels.shape[-1]}x{pixels.shape[-2]} but this model makes {size[1]}x{size[0]} videos; "
                         f"resize it first (e.g. ffmpeg -i <in> -vf scale={size[1]}:{size[0]} <out>)")
    if image is not None:
        frames = pattern.block_length(0)
        pixels = pixels[:1].expand(1 + tc * (frames - 1), -1, -1, -1)
    else:
        frames = context_frames(pixels.shape[0], pattern, tc)
        if frames == 0:
            need = 1 + tc * (pattern.block_length(0) - 1)
            raise ValueError(f"init_video has {pixels.shape[0]} frames; continuing needs at least {need} (one block)")
        used = 1 + tc * (frames - 1)
        if used < pixels.shape[0]:
            log.info("init_video: its last %d of %d frames are the context (%d latent frames: whole blocks, at most "
                     "the window)", used, pixels.shape[0], frames)
        pixels = pixels[pixels.shape[0] - used :]
    with torch.no_grad():
        return vae.encode(pixels[None].to(device, torch.float32)).float()


def context_frames(pixel_frames: int, pattern: CausalPattern, temporal_compression: int) -> int:
    """Latent frames of the context a video of `pixel_frames` gives: its last frames, as many whole blocks as
    fit in them and in the window (the cache holds no more); 0 when not even one block fits."""
    available = min(1 + (pixel_frames - 1) // temporal_compression, pattern.local_attn_size)
    best, frame = 0, 0
    while frame + pattern.block_length(frame) <= available:
        frame += pattern.block_length(frame)
        best = frame
    return best


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[1, F, C, H, W] in [-1, 1] -> [F, H, W, 3] uint8 (utils/video.py to_uint8's arithmetic, on the device)."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x.permute(0, 2, 3, 1).contiguous()
