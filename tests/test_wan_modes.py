"""The three attention modes of the Wan backbone agree: with diffusers, and with each other."""

import pytest
import torch

from model.wan.attention import CausalPattern
from model.wan.kv_cache import CrossAttnCache, KVCache
from model.wan.transformer import WanDiT
from tests.wan_tiny import TINY, tiny_diffusers

B, C, H, W = 2, 4, 8, 6  # latent batch, channels, height, width (4x3 patches = 12 tokens a frame)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    reference = tiny_diffusers(seed=0)
    model = WanDiT(**TINY)
    model.load_state_dict(reference.state_dict())
    return reference, model.eval()


def inputs(frames: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, frames, C, H, W, generator=gen)
    t = torch.rand(B, frames, generator=gen) * 1000
    ctx = torch.randn(B, 5, TINY["text_dim"], generator=gen)
    return x, t, ctx


def run_chunks(model, pattern, x, t, ctx, *, rerun: bool, capacity_frames=None):
    """Generate chunk by chunk; with rerun, first run each chunk on other inputs (it must be overwritten)."""
    frames = x.shape[1]
    cache = KVCache.for_model(model, pattern, batch_size=B, latent_hw=(H, W), max_frames=capacity_frames or frames)
    cross = CrossAttnCache(model.config.num_layers)
    outs, f = [], 0
    while f < frames:
        n = pattern.block_length(f)
        if rerun:
            model(torch.randn_like(x[:, f : f + n]), t[:, f : f + n].flip(0), ctx, kv_cache=cache, frame_offset=f, crossattn_cache=cross)
        outs.append(model(x[:, f : f + n], t[:, f : f + n], ctx, kv_cache=cache, frame_offset=f, crossattn_cache=cross))
        f += n
    return torch.cat(outs, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("per_frame", [False, True])
def test_bidirectional_matches_diffusers(pair, per_frame):
    reference, model = pair
    x, t, ctx = inputs(5)
    if not per_frame:
        t = t[:, :1].expand(B, 5).contiguous()
    ours = model(x, t, ctx)
    tokens_per_frame = (H // 2) * (W // 2)
    theirs = reference(x.permute(0, 2, 1, 3, 4), t.repeat_interleave(tokens_per_frame, dim=1), ctx).sample
    assert ours.shape == (B, 5, C, H, W)
    assert rel_err(ours, theirs.permute(0, 2, 1, 3, 4)) <= 1e-5
    if not per_frame:  # a [B] timestep is the same as a uniform [B, F] one
        assert torch.equal(model(x, t[:, 0], ctx), ours)


PATTERNS = [
    CausalPattern(num_frame_per_block=1),
    CausalPattern(num_frame_per_block=3),
    CausalPattern(num_frame_per_block=1, independent_first_frame=True),
    CausalPattern(num_frame_per_block=3, independent_first_frame=True),
    CausalPattern(num_frame_per_block=1, local_attn_size=3, sink_size=1),
    CausalPattern(num_frame_per_block=3, independent_first_frame=True, local_attn_size=4, sink_size=1),
    CausalPattern(num_frame_per_block=2, local_attn_size=4, sink_size=0),
]


@torch.no_grad()
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("rerun", [False, True], ids=["once", "overwrite"])
def test_chunked_cache_matches_whole_clip(pair, pattern, rerun):
    _, model = pair
    frames = 7 if pattern.independent_first_frame else 6
    x, t, ctx = inputs(frames)
    whole = model(x, t, ctx, causal=pattern)
    chunked = run_chunks(model, pattern, x, t, ctx, rerun=rerun)
    assert rel_err(chunked, whole) <= 1e-5
    # the causal mode is really causal and really differs from bidirectional attention
    assert rel_err(model(x, t, ctx), whole) > 1e-3
    early = model(x[:, :frames - pattern.num_frame_per_block], t[:, :frames - pattern.num_frame_per_block], ctx, causal=pattern)
    assert rel_err(early, whole[:, : early.shape[1]]) <= 1e-5


@torch.no_grad()
def test_rolling_window_serves_clips_longer_than_the_cache(pair):
    _, model = pair
    pattern = CausalPattern(num_frame_per_block=2, local_attn_size=4, sink_size=2)
    x, t, ctx = inputs(12)  # 12 frames through a cache of 2 + 4 frames: wraps twice
    cache = KVCache.for_model(model, pattern, batch_size=B, latent_hw=(H, W))
    assert cache.capacity_frames == 6
    whole = model(x, t, ctx, causal=pattern)
    chunked = run_chunks(model, pattern, x, t, ctx, rerun=True)
    assert rel_err(chunked, whole) <= 1e-5
    # the window matters: the last block differs from what full attention to the past gives
    full = model(x, t, ctx, causal=CausalPattern(num_frame_per_block=2))
    assert rel_err(whole[:, -2:], full[:, -2:]) > 1e-3


@torch.no_grad()
def test_cross_attention_cache_is_reused_and_reset(pair):
    _, model = pair
    x, t, ctx = inputs(3)
    cross = CrossAttnCache(model.config.num_layers)
    plain = model(x, t, ctx)
    assert torch.equal(model(x, t, ctx, crossattn_cache=cross), plain)
    assert cross.filled and all(kv is not None for kv in cross.kv)
    # a filled cache is used instead of the text: other text, same output
    assert torch.equal(model(x, t, torch.zeros_like(ctx), crossattn_cache=cross), plain)
    cross.reset()
    assert not torch.equal(model(x, t, torch.zeros_like(ctx), crossattn_cache=cross), plain)


def test_grad_chunk_equals_no_grad_chunk_and_checkpointing_keeps_gradients():
    model = WanDiT(**TINY)
    model.load_state_dict(tiny_diffusers(seed=3).state_dict())
    pattern = CausalPattern(num_frame_per_block=2, local_attn_size=2, sink_size=1)
    x, t, ctx = inputs(6, seed=4)

    def last_chunk_loss(checkpointing: bool):
        model.zero_grad()
        model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
        cache = KVCache.for_model(model, pattern, batch_size=B, latent_hw=(H, W))
        cross = CrossAttnCache(model.config.num_layers)
        with torch.no_grad():
            for f in (0, 2):
                model(x[:, f : f + 2], t[:, f : f + 2], ctx, kv_cache=cache, frame_offset=f, crossattn_cache=cross)
            reference = model(x[:, 4:], t[:, 4:], ctx, kv_cache=cache, frame_offset=4, crossattn_cache=cross)
        out = model(x[:, 4:], t[:, 4:], ctx, kv_cache=cache, frame_offset=4, crossattn_cache=cross)
        # a later no-grad pass overwrites the chunk's slots (the context pass) before backward runs
        with torch.no_grad():
            model(torch.randn_like(x[:, 4:]), t[:, 4:], ctx, kv_cache=cache, frame_offset=4, crossattn_cache=cross)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), reference, grads

    out, reference, grads = last_chunk_loss(checkpointing=False)
    assert rel_err(out, reference) <= 1e-6
    # the text path is recomputed under grad, so its projections receive gradients
    assert grads["condition_embedder.text_embedder.linear_1.weight"].abs().sum() > 0
    assert grads["blocks.1.attn2.to_k.weight"].abs().sum() > 0
    out_ckpt, _, grads_ckpt = last_chunk_loss(checkpointing=True)
    assert torch.equal(out_ckpt, out)
    worst = max(rel_err(grads_ckpt[n], g) for n, g in grads.items() if g.abs().max() > 0)
    assert worst <= 1e-5


# ---------------------------------------------------------------- errors


def test_bad_inputs_stop_with_clear_errors(pair):
    _, model = pair
    x, t, ctx = inputs(6)
    with pytest.raises(ValueError, match="latent channels.*in_channels=4"):
        model(torch.randn(B, 6, 3, H, W), t, ctx)
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        model(x[0], t, ctx)
    with pytest.raises(ValueError, match="does not split into blocks.*multiple of num_frame_per_block=4"):
        model(x, t, ctx, causal=CausalPattern(num_frame_per_block=4))
    with pytest.raises(ValueError, match="1 \\+ a multiple of num_frame_per_block=3"):
        model(x, t, ctx, causal=CausalPattern(num_frame_per_block=3, independent_first_frame=True))
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, t[:, :2], ctx)
    with pytest.raises(ValueError, match="text_dim=16"):
        model(x, t, ctx[..., :8])
    with pytest.raises(ValueError, match="local_attn_size=1 must be"):
        CausalPattern(num_frame_per_block=3, local_attn_size=1)


def test_bad_chunks_stop_with_clear_errors(pair):
    _, model = pair
    pattern = CausalPattern(num_frame_per_block=2)
    x, t, ctx = inputs(6)
    cache = KVCache.for_model(model, pattern, batch_size=B, latent_hw=(H, W), max_frames=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="chunks must come in order"):
            model(x[:, :2], t[:, :2], ctx, kv_cache=cache, frame_offset=2)
        model(x[:, :2], t[:, :2], ctx, kv_cache=cache, frame_offset=0)
        model(x[:, 2:4], t[:, 2:4], ctx, kv_cache=cache, frame_offset=2)
        with pytest.raises(ValueError, match=r"beyond the cache, which holds 4 frames.*local_attn_size"):
            model(x[:, 4:6], t[:, 4:6], ctx, kv_cache=cache, frame_offset=4)
        with pytest.raises(ValueError, match="only the latest chunk can be run again"):
            model(x[:, :2], t[:, :2], ctx, kv_cache=cache, frame_offset=0)
        with pytest.raises(ValueError, match="is not one block of the pattern"):
            model(x[:, :3], t[:, :3], ctx, kv_cache=cache, frame_offset=2)
        with pytest.raises(ValueError, match="batch size 1"):
            model(x[:1, 2:4], t[:1, 2:4], ctx[:1], kv_cache=cache, frame_offset=2)
        assert cache.end_frame == 4  # failed calls changed nothing
        cache.reset()
        model(x[:, :2], t[:, :2], ctx, kv_cache=cache, frame_offset=0)
        assert cache.end_frame == 2
    with pytest.raises(ValueError, match="max_frames"):
        KVCache.for_model(model, pattern, batch_size=B, latent_hw=(H, W))
    with pytest.raises(ValueError, match="rope_max_seq_len=64"):
        big = KVCache.for_model(model, CausalPattern(1, local_attn_size=1), batch_size=B, latent_hw=(H, W))
        big.end_frame = 64
        model(x[:, :1], t[:, :1], ctx, kv_cache=big, frame_offset=64)


def test_attention_backend_selection(pair):
    _, model = pair
    with pytest.raises(ValueError, match="unknown; expected one of"):
        model.set_attention_backend("xformers")
    from model.wan.attention import flash_attn_available

    if not flash_attn_available():
        with pytest.raises(ValueError, match="flash_attn package is not installed"):
            model.set_attention_backend("flash_attn")
    model.set_attention_backend("sdpa")
    assert model.attention_backend == "sdpa"


def test_mixed_precision_runs_from_float32_inputs(pair):
    """Trained nets: fp32 weights under bf16 autocast; frozen nets: bf16 weights. Float32 in, float32 out."""
    _, model = pair
    x, t, ctx = inputs(4)
    pattern = CausalPattern(num_frame_per_block=2)
    with torch.no_grad():
        reference = model(x, t, ctx, causal=pattern)
        model.autocast_dtype = torch.bfloat16
        try:
            mixed = model(x, t, ctx, causal=pattern)
            chunked = run_chunks(model, pattern, x, t, ctx, rerun=False)
        finally:
            model.autocast_dtype = None
        frozen = WanDiT(**TINY)
        frozen.load_state_dict(model.state_dict())
        frozen = frozen.to(torch.bfloat16)
        frozen_out = frozen(x, t, ctx, causal=pattern)
    for out in (mixed, chunked, frozen_out):
        assert out.dtype == torch.float32 and out.shape == reference.shape
        assert 1e-5 < rel_err(out, reference) <= 5e-2  # really bf16, and still close


def _rollout_like(model, x, ctx, pattern, grad: bool):
    """Chunk calls as the training rollout makes them (a no-grad step, the exit call, the context pass),
    through one KV cache and cross-attention cache; returns the exit outputs and, with grad, the gradients."""
    cache = KVCache.for_model(model, pattern, batch_size=B, latent_hw=(H, W), max_frames=x.shape[1])
    cross = CrossAttnCache(model.config.num_layers)
    outs, loss, step = [], 0.0, pattern.num_frame_per_block
    for start in range(0, x.shape[1], step):
        chunk, t = x[:, start:start + step], torch.full((B, step), 750.0)
        with torch.no_grad():
            chunk = model(chunk, t, ctx, kv_cache=cache, frame_offset=start, crossattn_cache=cross)
        with torch.set_grad_enabled(grad):
            out = model(chunk, t / 3, ctx, kv_cache=cache, frame_offset=start, crossattn_cache=cross)
        loss = loss + out.square().mean() if grad else loss
        outs.append(out.detach())
        with torch.no_grad():
            model(out.detach(), torch.zeros_like(t), ctx, kv_cache=cache, frame_offset=start, crossattn_cache=cross)
    if grad:
        loss.backward()
    return torch.cat(outs, 1), ({n: p.grad.clone() for n, p in model.named_parameters()} if grad else None)


@pytest.mark.parametrize("pattern", [CausalPattern(2), CausalPattern(1, local_attn_size=2, sink_size=1)], ids=["cache", "rolling"])
def test_compiled_blocks_give_the_eager_rollout_and_gradients_with_one_graph_for_all_layers(pattern):
    """set_compiled_blocks: each block of a chunk call as one torch.compile'd graph. A rollout's calls
    without and with grad (full checkpointing, whose forward writes the cache its recompute reads) give
    eager's outputs and gradients; the graphs are shared by the layers (the layer index is not in them),
    so 4 layers x 4 chunk positions stay under a limit of 16 compiles (no fallback: error); about 10
    graphs cover the chunk positions' special cases (first slot, full cache), text modes and grad modes."""
    from tests.wan_tiny import randomize

    torch._dynamo.reset()
    x, _, ctx = inputs(8, seed=4)
    results = {}
    for compiled in (False, True):
        model = randomize(WanDiT(**{**TINY, "num_layers": 4}), 0)
        model.enable_gradient_checkpointing()
        model.set_fused_elementwise(True)
        model.set_compiled_blocks(compiled)
        with torch._dynamo.config.patch(recompile_limit=16, fail_on_recompile_limit_hit=True):
            results[compiled] = (_rollout_like(model, x, ctx, pattern, grad=False),
                                 _rollout_like(model, x, ctx, pattern, grad=True))
    (eager_nograd, _), (eager_grad, eager_grads) = results[False]
    (comp_nograd, _), (comp_grad, comp_grads) = results[True]
    assert rel_err(comp_nograd, eager_nograd) < 1e-5
    assert rel_err(comp_grad, eager_grad) < 1e-5
    for n, g in eager_grads.items():
        assert ((comp_grads[n] - g).norm() / g.norm()).item() < 1e-4, n
