"""The Wan2.1 DiT in three attention modes: bidirectional, block-causal on a clip, chunked with a KV cache.

`WanDiT` is diffusers' `WanTransformer3DModel` (same parameters, config and `from_pretrained`) with
its own forward. Each transformer block is re-classed to `WanDiTBlock`, a subclass that adds no
parameters and only replaces `forward`, so per-block wrappers (FSDP2, activation checkpointing)
see the per-block compute as `block(...)`, exactly as they would on diffusers' class.

The arithmetic follows diffusers' forward step for step (float32 modulation and norms, RoPE in
float32), so bidirectional outputs match it; the timestep is per frame, `[B, F]`, and RoPE frame
positions are absolute (`frame_offset + f`) in every mode, so the three modes agree exactly.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

from .attention import CausalPattern, attention, block_causal_attention, check_backend
from .fused import block_ops, feed_forward
from .kv_cache import ChunkPlan, CrossAttnCache, KVCache, attend_cached, compact_text
from .weights import raise_on_mismatch

ROPE_THETA = 10000.0  # diffusers' WanRotaryPosEmbed default, as in the original Wan


@dataclass
class AttnSpec:
    """How the self-attention of one forward call runs (shared by all blocks of the call)."""

    backend: str
    num_frames: int
    pattern: CausalPattern | None = None  # whole-clip block-causal when set (and no cache)
    cache: KVCache | None = None  # chunk mode when set
    plan: ChunkPlan | None = None
    cross: CrossAttnCache | None = None
    cross_mode: str = "compute"  # "compute" | "store" (fill the cache) | "reuse"
    fused: bool = False  # element-wise stretches through torch.compile (model/wan/fused.py)
    compiled: bool = False  # chunk calls run each block as one compiled graph (WanDiT.set_compiled_blocks)
    ops: object = None  # block_ops(fused), resolved by the caller once per call (a compiled block cannot call block_ops)


class WanDiTBlock(WanTransformerBlock):
    """A diffusers Wan block whose self-attention knows the three modes. No parameters of its own."""

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        spec: AttnSpec,
        layer: int,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        write: bool = True,
        recompute: bool = False,
    ) -> torch.Tensor:
        """recompute: run without grad now and again with grad in the backward (full checkpointing
        inside the block, so inside its FSDP unit; WanDiT._checkpointed explains why)."""
        # This layer's cache buffers and cached text K/V, looked up here so that the block's
        # arithmetic (_forward) depends on tensors, not on the layer index: one compiled graph
        # then serves all layers and chunk positions (set_compiled_blocks).
        kv = (spec.cache.k[layer], spec.cache.v[layer]) if spec.cache is not None else None
        cross = spec.cross.kv[layer] if spec.cross_mode == "reuse" else None
        forward = WanDiTBlock._forward
        if spec.compiled and spec.cache is not None and spec.cross_mode != "store":
            forward = _compiled_block_forward()
        if recompute:
            first, generation = [True], spec.cache.generation if spec.cache is not None else None

            def run(x, e, context):  # the cache is written by the forward, not by the recompute
                again, first[0] = not first[0], False
                if again and spec.cache is not None and spec.cache.generation != generation:
                    raise RuntimeError(
                        "the KV cache was reset between a checkpointed chunk call and its backward, so the "
                        "recompute would read other keys: call backward() before reusing the cache"
                    )
                # The forward writes the chunk and reads the cache slice; `past` (views of the same
                # buffers, or copies) is for the recompute: a compiled graph must not get an input
                # that aliases another input it writes to.
                if not again and write and spec.cache is not None and not spec.cache.pattern.windowed:
                    return forward(self, x, e, context, rope, spec, kv, cross, None, True, layer)
                return forward(self, x, e, context, rope, spec, kv, cross, past, write and not again, layer)

            return torch.utils.checkpoint.checkpoint(run, x, e, context, use_reentrant=True, preserve_rng_state=False)
        return forward(self, x, e, context, rope, spec, kv, cross, past, write, layer)

    def _forward(self, x, e, context, rope, spec: AttnSpec, kv, cross, past, write: bool, layer: int) -> torch.Tensor:
        # x: [B, F*T, D] tokens, frame-major; e: [B, F, 6, D] per-frame modulation; kv: this layer's
        # self-attention cache buffers; cross: its cached text K/V ("reuse"); layer: only to store those
        batch, length, dim = x.shape
        frames = e.shape[1]
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table.unsqueeze(0) + e.float()).chunk(6, dim=2)

        def per_frame(h: torch.Tensor) -> torch.Tensor:  # [B, F*T, D] -> [B, F, T, D]
            return h.view(batch, frames, length // frames, dim)

        # 1. Self-attention (bidirectional, block-causal, or over the KV cache)
        ops = spec.ops
        h = ops.norm_modulate(per_frame(x), scale, shift, self.norm1.eps).view(batch, length, dim)
        h = self._self_attention(h, rope, spec, kv, past, write, ops)

        # 2. Cross-attention to the text (K/V possibly cached per prompt)
        x, h = ops.gated_add_norm(per_frame(x), per_frame(h), gate, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        h = self._cross_attention(h.view(batch, length, dim), context, spec, cross, layer, write, ops)

        # 3. Feed-forward
        x, h = ops.add_norm_modulate(x, per_frame(h), c_scale, c_shift, self.norm3.eps)
        h = feed_forward(self.ffn, h, spec.fused)
        return ops.gated_add_out(x.view(batch, length, dim), h, c_gate)

    def _self_attention(self, h, rope, spec: AttnSpec, kv, past, write, ops):
        attn = self.attn1
        q, k = ops.qk_norm_rope(attn.to_q(h), attn.to_k(h), attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps,
                                attn.heads, *rope)
        v = attn.to_v(h).unflatten(2, (attn.heads, -1))
        if spec.cache is not None:
            k, v = attend_cached(*kv, spec.plan, k, v, past=past, write=write)
            out = attention(q, k, v, spec.backend)
        elif spec.pattern is not None:
            out = block_causal_attention(q, k, v, spec.pattern, spec.num_frames)
        else:
            out = attention(q, k, v, spec.backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(q)))

    def _cross_attention(self, h, context, spec: AttnSpec, cross, layer, write, ops):
        attn = self.attn2
        q = ops.rms_norm(attn.to_q(h), attn.norm_q.weight, attn.norm_q.eps).unflatten(2, (attn.heads, -1))
        if spec.cross_mode == "reuse":
            k, v = cross
        else:
            k, v = self.cross_kv(context)
            if spec.cross_mode == "store" and write:
                spec.cross.store(layer, k.detach(), v.detach())
        bias = spec.cross.text_bias if spec.cross_mode == "reuse" else None  # the cache's K/V are compacted
        out = attention(q, k, v, spec.backend, bias)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(q)))

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of the projected text. context: [B, L, D] -> [B, L, H, D/H] each."""
        attn = self.attn2
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        return k, attn.to_v(context).unflatten(2, (attn.heads, -1))


class WanDiT(WanTransformer3DModel):
    """Wan2.1 text-to-video DiT with bidirectional, block-causal and KV-cache attention.

    forward(x [B, F, C, H, W], timestep [B, F] or [B], context [B, L, text_dim]) returns Wan's flow
    prediction [B, F, C, H, W] (noise minus clean latent), with
    - nothing else: bidirectional attention over the clip (teacher, critic);
    - `causal=CausalPattern(...)`: whole-clip block-causal attention;
    - `kv_cache=KVCache(...)`, `frame_offset=f`: the next chunk (one block) at absolute frame f,
      attending to the cached past and itself, its K/V written into the cache.
    `crossattn_cache=CrossAttnCache(...)` computes the text K/V once and reuses them.
    """

    _no_split_modules = ["WanTransformerBlock", "WanDiTBlock"]

    @functools.wraps(WanTransformer3DModel.__init__)  # keeps the signature that ConfigMixin reads
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.image_dim is not None or self.config.added_kv_proj_dim is not None:
            raise ValueError("image-conditioned Wan (I2V: image_dim / added_kv_proj_dim) is not supported")
        if self.config.patch_size[0] != 1:
            raise ValueError(f"temporal patch size must be 1 (per-frame timesteps), got {self.config.patch_size}")
        for block in self.blocks:
            block.__class__ = WanDiTBlock  # same parameters, our forward
        self.attention_backend = "sdpa"
        self.fused_elementwise = False  # set_fused_elementwise: compiled norms / modulation / RoPE
        self.compiled_blocks = False  # set_compiled_blocks: chunk calls through one compiled graph per block
        self.compact_text, self.compact_text_bucket = False, 64  # set_compact_text
        self.autocast_dtype: torch.dtype | None = None  # set for mixed-precision training
        # the dtype a wrapper gathers the parameters in for compute (FSDP's MixedPrecisionPolicy); None: their own
        self.wrapped_param_dtype: torch.dtype | None = None
        self.checkpoint_policy = "full"  # with gradient checkpointing: "full" or "save_attention" (see _checkpointed)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' from_pretrained, made strict: any missing, unexpected or misshapen key is an error."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # A shard index can list a tensor its file lacks: diffusers then leaves it on the meta device.
        on_meta = {name for name, t in model.state_dict().items() if t.is_meta}
        raise_on_mismatch(
            sorted(set(info["missing_keys"]) | on_meta),
            sorted(info["unexpected_keys"]),
            sorted(str(m) for m in info["mismatched_keys"]),
            f"{args[0] if args else kwargs.get('pretrained_model_name_or_path')} does not match {cls.__name__}",
        )
        return (model, info) if want_info else model

    def set_attention_backend(self, backend: str) -> None:
        """Select the kernel for unmasked attention: "sdpa" (default), "cudnn", "fa4" or "flash_attn"."""
        device = self.patch_embedding.weight.device
        check_backend(backend, None if device.type == "meta" else device)
        self.attention_backend = backend

    def set_fused_elementwise(self, fused: bool) -> None:
        """Run the blocks' norms, modulation, RoPE and gated residuals as torch.compile'd kernels
        (model/wan/fused.py); the eager ops are diffusers' and give its numbers exactly."""
        self.fused_elementwise = bool(fused)

    def set_compiled_blocks(self, compiled: bool) -> None:
        """Run each block of a chunk call (KV cache) as one torch.compile'd graph: the rollout's many
        short calls are bound by the host's per-operator work (docs/performance.md). One graph serves
        every layer and, once the cache length has varied, every chunk position (dynamic shapes);
        the backward of a grad call is compiled too. For training: CUDA-graph capture (inference's
        cuda_graphs lever) must not meet a first call's compilation."""
        if compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.compiled_blocks = bool(compiled)

    def set_compact_text(self, enabled: bool, bucket: int = 64) -> None:
        """Fill cross-attention caches with the text's padding folded into three keys (compact_text):
        the same attention over ~L/8 keys instead of 512 for a short prompt."""
        self.compact_text = bool(enabled)
        self.compact_text_bucket = bucket

    @torch.no_grad()
    def fill_crossattn_cache(self, context: torch.Tensor, cache: CrossAttnCache) -> None:
        """Project the text and store every block's cross-attention K/V (what the first chunk call
        would store), so that all chunk calls of a rollout are alike ("reuse")."""
        self.store_text_kv(self.prepare_text(context, cache), cache)

    @torch.no_grad()
    def prepare_text(self, context: torch.Tensor, cache: CrossAttnCache) -> torch.Tensor:
        """The text the cache will hold: compacted (and its key bias set on the cache) with compact_text on."""
        packed = compact_text(context, self.compact_text_bucket) if self.compact_text else None
        cache.set_text_bias(None if packed is None else packed[1])
        return context if packed is None else packed[0]

    @torch.no_grad()
    def store_text_kv(self, context: torch.Tensor, cache: CrossAttnCache) -> None:
        """fill_crossattn_cache after prepare_text: no host syncs, so CUDA graphs can capture it."""
        if self.autocast_dtype is None:  # as forward(): frozen networks compute in their parameters' dtype
            autocast, context = contextlib.nullcontext(), context.to(self.patch_embedding.weight.dtype)
        else:
            autocast = torch.autocast(context.device.type, dtype=self.autocast_dtype)
        with autocast:
            text = self.condition_embedder.text_embedder(context)
            cache.set_context(text)
            for layer, block in enumerate(self.blocks):
                cache.store(layer, *block.cross_kv(text))

    # ------------------------------------------------------------------ helpers
    def _check_input(self, x, timestep, context, causal, kv_cache, frame_offset):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, F, C, H, W] latents, got shape {tuple(x.shape)}")
        batch, frames, channels, height, width = x.shape
        if channels != cfg.in_channels:
            raise ValueError(
                f"x has {channels} latent channels but the model expects in_channels={cfg.in_channels} "
                f"(x is [B, F, C, H, W]; did you pass [B, C, F, H, W]?)"
            )
        _, p_h, p_w = cfg.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p_h}x{p_w}")
        if timestep.shape not in ((batch,), (batch, frames)):
            raise ValueError(f"timestep must be [B] or [B, F] = [{batch}, {frames}], got {tuple(timestep.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be [B={batch}, L, text_dim={cfg.text_dim}], got {tuple(context.shape)}"
            )
        if causal is not None and kv_cache is not None:
            raise ValueError("pass causal= for a whole block-causal clip or kv_cache= for a chunk, not both")
        if kv_cache is None and frame_offset != 0:
            raise ValueError("frame_offset is only meaningful with a kv_cache")
        if causal is not None:
            causal.check_clip(frames)
        limits = (frame_offset + frames, height // p_h, width // p_w)
        if max(limits) > cfg.rope_max_seq_len:
            raise ValueError(
                f"positions up to {max(limits)} (frames, height or width in patches) exceed "
                f"rope_max_seq_len={cfg.rope_max_seq_len}"
            )

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> [B, F*h*w, D] tokens, frame-major (the 3-D patch embedding)."""
        return self.patch_embedding(x.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2).contiguous()

    def _rope(self, frame_offset: int, frames: int, height: int, width: int, device):
        """cos, sin: [F*h*w, 1, head_dim/2] float32 at absolute frame positions."""
        rope = self.rope
        parts_cos, parts_sin = [], []
        for axis, (dim, start, count) in enumerate(
            ((rope.t_dim, frame_offset, frames), (rope.h_dim, 0, height), (rope.w_dim, 0, width))
        ):
            pos = torch.arange(start, start + count, device=device, dtype=torch.float64)
            cos, sin = get_1d_rotary_pos_embed(
                dim, pos, ROPE_THETA, use_real=True, freqs_dtype=torch.float64
            )
            shape = [1, 1, 1, dim // 2]
            shape[axis] = count
            parts_cos.append(cos[:, 0::2].view(shape).expand(frames, height, width, -1))
            parts_sin.append(sin[:, 1::2].view(shape).expand(frames, height, width, -1))
        cos = torch.cat(parts_cos, dim=-1).reshape(frames * height * width, 1, -1)
        sin = torch.cat(parts_sin, dim=-1).reshape(frames * height * width, 1, -1)
        return cos, sin

    def _text_context(self, context, crossattn_cache):
        """Project the text once per prompt when a cache is given; say how blocks get their K/V."""
        if crossattn_cache is None:
            return self.condition_embedder.text_embedder(context), "compute"
        wants_grad = torch.is_grad_enabled() and self._text_kv_trained()
        if self.compact_text and not crossattn_cache.filled and not wants_grad:
            self.fill_crossattn_cache(context, crossattn_cache)  # compacted, its bias set: then "reuse"
        if crossattn_cache.filled and not wants_grad:
            if crossattn_cache.context.shape[0] != context.shape[0]:
                raise ValueError("the cross-attention cache holds another batch of prompts; reset() it first")
            return crossattn_cache.context, "reuse"
        projected = self.condition_embedder.text_embedder(context)
        if crossattn_cache.filled:
            return projected, "compute"
        crossattn_cache.set_text_bias(None)
        crossattn_cache.set_context(projected.detach())
        return projected, "store"

    def _text_kv_trained(self) -> bool:
        """Whether a weight the cross-attention K/V depend on trains: the text embedder's, or the blocks'
        to_k / to_v (a LoRA network trains only their adapters): then they are computed with grad, not reused."""
        modules = [self.condition_embedder.text_embedder]
        modules += [m for block in self.blocks for m in (block.attn2.to_k, block.attn2.to_v)]
        return any(p.requires_grad for m in modules for p in m.parameters())

    # ------------------------------------------------------------------ forward
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the forward computes in: the autocast dtype if set, else the parameters'."""
        return self.autocast_dtype or self.wrapped_param_dtype or self.patch_embedding.weight.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        """Inputs in any float dtype; the output comes back in x's dtype.

        With `autocast_dtype` (trained networks: fp32 master weights, bf16 compute, as mixed
        precision trains) the forward runs under autocast; otherwise inputs are cast to the
        parameters' dtype (frozen bf16 networks).
        """
        out_dtype = x.dtype
        if self.autocast_dtype is None:
            param_dtype = self.patch_embedding.weight.dtype
            out = self._forward(x.to(param_dtype), timestep, context.to(param_dtype), **kwargs)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                out = self._forward(x, timestep, context, **kwargs)
        return out.to(out_dtype) if isinstance(out, torch.Tensor) else out  # features: in the compute dtype

    def _forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        causal: CausalPattern | None = None,
        kv_cache: KVCache | None = None,
        frame_offset: int = 0,
        crossattn_cache: CrossAttnCache | None = None,
        features: tuple[int, ...] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        # x: [B, F, C, H, W]; timestep: [B, F] (or [B]); context: [B, L, text_dim]
        # features: return the hidden states [B, F*h*w, D] after these blocks (in that order) instead of
        # the flow, and stop after the deepest of them (a discriminator head reads them; model/wan/discriminator.py)
        self._check_input(x, timestep, context, causal, kv_cache, frame_offset)
        if features is not None:
            bad = [i for i in features if not 0 <= i < len(self.blocks)]
            if not features or bad:
                raise ValueError(f"features={list(features)}: block indices must be in 0..{len(self.blocks) - 1}")
        batch, frames, _, height, width = x.shape
        _, p_h, p_w = self.config.patch_size
        h, w = height // p_h, width // p_w
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch, frames)

        # 1. Patchify: [B, F, C, H, W] -> [B, F*h*w, D], frame-major tokens
        tokens = self._patchify(x)

        # 2. Per-frame time embedding (temb [B, F, D]) and its modulation (e [B, F, 6, D])
        embedder = self.condition_embedder
        t_freq = embedder.timesteps_proj(timestep.reshape(-1)).unflatten(0, (batch, frames))
        t_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        temb = embedder.time_embedder(t_freq.to(t_dtype)).type_as(tokens)
        e = embedder.time_proj(embedder.act_fn(temb)).unflatten(2, (6, -1))

        # 3. Text context and RoPE at absolute frame positions
        text, cross_mode = self._text_context(context, crossattn_cache)
        rope = self._rope(frame_offset, frames, h, w, x.device)
        plan = None
        if kv_cache is not None:
            plan = kv_cache.plan(frame_offset, frames, batch, h * w)
        # A compiled block is one op to selective checkpointing, which then could keep nothing of it:
        # save_attention's grad calls stay eager.
        compiled = self.compiled_blocks and not (torch.is_grad_enabled() and self.gradient_checkpointing
                                                 and self.checkpoint_policy == "save_attention")
        spec = AttnSpec(self.attention_backend, frames, causal, kv_cache, plan, crossattn_cache, cross_mode,
                        self.fused_elementwise, compiled, block_ops(self.fused_elementwise))

        # 4. Transformer blocks (optionally with activation checkpointing)
        hidden: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._checkpointed(block, tokens, e, text, rope, spec, layer)
            else:
                tokens = block(tokens, e, text, rope, spec, layer)
            if features is not None and layer in features:
                hidden[layer] = tokens
                if layer == max(features):  # the blocks above and the output head are not needed
                    return [hidden[i] for i in features]

        # 5. Output norm, projection, unpatchify to [B, F, C, H, W]
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        out = self.norm_out(tokens.view(batch, frames, h * w, -1).float()) * (1 + scale) + shift
        out = self.proj_out(out.type_as(tokens))
        out = out.view(batch, frames, h, w, p_h, p_w, -1).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(batch, frames, -1, height, width)

    def _checkpointed(self, block, tokens, e, text, rope, spec: AttnSpec, layer):
        """Checkpoint one block; cache writes happen in the forward pass only, not in the recompute.

        With a KV cache, the cached past is taken before checkpointing (copied where later chunks
        may overwrite those slots) so that the recompute sees the keys the forward saw.
        """
        if self.checkpoint_policy == "full" and any(t is not None and t.requires_grad for t in (tokens, e, text)):
            # Full checkpointing as the block's own reentrant checkpoint: its forward runs without grad
            # (no autograd graph, no saved-tensor hooks; the rollout's many chunk calls are bound by
            # that host time), the recompute runs with grad in the backward. Inside the block, so
            # FSDP's unit hooks stay outside it and see one ordinary forward and backward. Reentrant
            # checkpointing loses parameter gradients when no input needs grad: then the branch below.
            # Autograd never sees `past` here, so it can be a view of the cache where later chunks
            # leave it alone (no local window), not a copy held until the backward (at Wan-1.3B size,
            # 21 frames: ~18 GB of copies over a rollout's 7 grad calls).
            past = spec.cache.past(layer, spec.plan, view=True) if spec.cache is not None else None
            return block(tokens, e, text, rope, spec, layer, past=past, recompute=True)
        past = spec.cache.past(layer, spec.plan) if spec.cache is not None else None
        first = [True]

        def run(tokens, e, text, past):
            write, first[0] = first[0], False
            return block(tokens, e, text, rope, spec, layer, past=past, write=write)

        context_fn = _save_attention_context if self.checkpoint_policy == "save_attention" else noop_context_fn
        return torch.utils.checkpoint.checkpoint(run, tokens, e, text, past, use_reentrant=False, context_fn=context_fn)


@functools.cache
def _compiled_block_forward():
    """WanDiTBlock._forward through torch.compile (built on first use). The block is an argument, so
    its parameters are graph inputs and the 30 blocks share the graph; the plan's slot numbers and
    the cache length become symbolic after the first chunk position that differs."""
    return torch.compile(WanDiTBlock._forward, fullgraph=True)


# Selective checkpointing: attention is most of a block's FLOPs at video lengths but its output is only
# [B, L, heads, head_dim] (+ log-sum-exp), so keep it and recompute the projections and elementwise ops.
_ATTENTION_OPS = {
    torch.ops.wan.fa4_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention_context():
    return create_selective_checkpoint_contexts(_save_attention_policy)


class WanImageDiT(WanDiT):
    """Wan's DiT for single images (an image student distilled from a video teacher: model/image_kd.py).

    The same blocks, text and time embeddings and output head as WanDiT (its config and diffusers-format
    folders), with the two video parts removed:
    - a 2-D patch embedding (`nn.Conv2d`, weight [D, C, p_h, p_w]) instead of the 3-D one;
    - no temporal RoPE axis: tokens are rotated along height and width only, and Wan's temporal channel
      group of each head is left unrotated, as Wan's own rotation leaves it at frame 0.
    Input is one frame, x [B, 1, C, H, W] (the Wan call, so methods and samplers need no special case);
    more frames, `causal=` and `kv_cache=` are errors: there is no time axis and no time-causal machinery.
    On one frame it computes what a WanDiT with the same weights computes (the 3-D kernel read as 2-D).
    """

    @functools.wraps(WanTransformer3DModel.__init__)  # keeps the signature that ConfigMixin reads
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _, p_h, p_w = self.config.patch_size
        dim = self.config.num_attention_heads * self.config.attention_head_dim
        self.patch_embedding = torch.nn.Conv2d(self.config.in_channels, dim, kernel_size=(p_h, p_w), stride=(p_h, p_w))

    def _check_input(self, x, timestep, context, causal, kv_cache, frame_offset):
        if causal is not None or kv_cache is not None:
            raise ValueError("WanImageDiT makes single images: it has no block-causal (causal=) or KV-cache (kv_cache=) mode")
        if x.ndim == 5 and x.shape[1] != 1:
            raise ValueError(f"WanImageDiT makes single images: x must be [B, 1, C, H, W], got num_frames={x.shape[1]}")
        super()._check_input(x, timestep, context, causal, kv_cache, frame_offset)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 1, C, H, W] -> [B, h*w, D]
        return self.patch_embedding(x[:, 0]).flatten(2).transpose(1, 2).contiguous()

    def _rope(self, frame_offset: int, frames: int, height: int, width: int, device):
        """cos, sin: [h*w, 1, head_dim/2], rotations along height and width; the temporal channel pairs are
        not rotated (cos 1, sin 0): no frame position exists."""
        cos, sin = super()._rope(0, 1, height, width, device)
        pairs = self.rope.t_dim // 2
        cos[..., :pairs], sin[..., :pairs] = 1.0, 0.0
        return cos, sin
