"""GPU checks of the speed levers (run on the device machine): each gives the plain path's outputs."""

import pytest
import torch

from model.base import MethodConfig
from model.wan.attention import CausalPattern, fa4_supported
from model.wan.kv_cache import CrossAttnCache, KVCache
from model.wan.text_encoder import WanTextEncoder
from model.wan.transformer import WanDiT
from model.wan.vae import WanVAE
from pipeline.cuda_graphs import ChunkGraphs
from pipeline.rollout import rollout
from model.schedule import FlowSchedule
from tests.wan_folder import TRANSFORMER, tiny_wan_folder  # noqa: F401  (a fixture)
from tests.wan_tiny import TINY, randomize
from engine.inference import Student, generate
from engine.items import Item
from utils.speed import LEVERS, SpeedSchema, apply_levers, resolve_levers

pytestmark = pytest.mark.gpu

# Heads of 64 (cuDNN's and flash's sizes), 390 tokens a frame (not a multiple of 128)
SMALL = {**TINY, "num_attention_heads": 4, "attention_head_dim": 64, "ffn_dim": 512, "num_layers": 3}
NO_FA4 = fa4_supported(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA"
BF16_TOL = 3e-2  # bf16 activations through 3 blocks: kernels that sum in another order differ by a few ulps


def bf16_decode_floor(folder, latents) -> float:
    """How far the plain bf16 stream decode is from a float32 one: a random-weight VAE amplifies bf16
    rounding in its max pixel error, so a lever may differ from plain by about that much again."""
    decoded = []
    for dtype in ("bfloat16", "float32"):
        decoder = WanVAE(str(folder), dtype=dtype, device="cuda").stream_decoder(latents.shape[0])
        decoded.append(decoder.decode(latents))
    return rel_err(decoded[0], decoded[1])


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def small_model():
    torch.manual_seed(0)
    return randomize(WanDiT(**SMALL), seed=0).to("cuda", torch.bfloat16).eval().requires_grad_(False)


def roll(runner, model, noise, ctx, kv=None, cross=None):
    pattern = CausalPattern(3)
    schedule = FlowSchedule(5.0)
    steps = schedule.denoising_steps([1000, 750, 500, 250], True)
    kv = kv or KVCache.for_model(model, pattern, batch_size=noise.shape[0], latent_hw=noise.shape[-2:], max_frames=noise.shape[1])
    cross = cross or CrossAttnCache(model.config.num_layers)
    kv.reset()
    cross.reset()
    gen = torch.Generator("cuda").manual_seed(3)
    return rollout(runner, noise, ctx, steps, pattern, schedule=schedule, rng=gen, kv_cache=kv, crossattn_cache=cross).video


def inputs(seed: int):
    gen = torch.Generator("cuda").manual_seed(seed)
    noise = torch.randn(2, 9, 4, 30, 52, generator=gen, device="cuda")
    ctx = torch.randn(2, 7, SMALL["text_dim"], generator=gen, device="cuda", dtype=torch.bfloat16)
    return noise, ctx


@torch.no_grad()
@pytest.mark.parametrize("lever", ["cudnn_attention", "fa4_attention", "fused_elementwise", "compact_text"])
def test_dit_lever_matches_plain_rollout(lever):
    if lever == "fa4_attention" and NO_FA4:
        pytest.skip(NO_FA4)
    model = small_model()
    noise, ctx = inputs(1)
    if lever == "compact_text":  # as Wan's text encoder gives it: 512 positions, zeros past the prompt's tokens
        ctx = torch.cat([ctx, ctx.new_zeros(2, 505, ctx.shape[2])], dim=1)
        ctx[1, 5:] = 0
    plain = roll(model, model, noise, ctx)
    if lever == "compact_text":
        model.set_compact_text(True)
        graphs = ChunkGraphs(model)
        kv = KVCache.for_model(model, CausalPattern(3), batch_size=2, latent_hw=(30, 52), max_frames=9)
        cross = CrossAttnCache(model.config.num_layers)
        eager = roll(model, model, noise, ctx, kv, cross)
        assert cross.kv[0][0].shape[1] == 64 and cross.text_bias.shape == (2, 64)
        for _ in range(2):  # captured, then replayed with the cache's compacted K/V and bias
            replayed = roll(graphs, model, noise, ctx, kv, cross)
            assert rel_err(replayed, eager) <= 1e-6
    if lever == "cudnn_attention":
        model.set_attention_backend("cudnn")
    elif lever == "fa4_attention":  # chunks 1 and 2 (2,340 and 3,510 keys) on FA4, chunk 0 and the text on cuDNN
        model.set_attention_backend("fa4")
    elif lever == "fused_elementwise":
        model.set_fused_elementwise(True)
    fast = roll(model, model, noise, ctx)
    err = rel_err(fast, plain)
    print(f"{lever}: rollout max rel err {err:.2e}")
    assert fast.isfinite().all() and err <= BF16_TOL


@torch.no_grad()
@pytest.mark.parametrize("backend", ["cudnn", "fa4"])
def test_cuda_graphs_replay_exactly_across_videos_and_prompts(backend):
    if backend == "fa4" and NO_FA4:
        pytest.skip(NO_FA4)
    model = small_model()
    model.set_attention_backend(backend)
    model.set_fused_elementwise(True)
    graphs = ChunkGraphs(model)
    pattern = CausalPattern(3)
    kv = KVCache.for_model(model, pattern, batch_size=2, latent_hw=(30, 52), max_frames=9)
    cross = CrossAttnCache(model.config.num_layers)
    for seed in (1, 2, 1):  # a second prompt batch and noise, then the first again: graphs are reused
        noise, ctx = inputs(seed)
        eager = roll(model, model, noise, ctx, kv, cross)
        replayed = roll(graphs, model, noise, ctx, kv, cross)
        err = rel_err(replayed, eager)
        print(f"seed {seed}: {len(graphs.graphs)} graphs, replay vs eager max rel err {err:.2e}")
        assert len(graphs.graphs) == 3 and err <= 1e-6


FP8_TOL = 0.1  # fp8 (e4m3: 3 mantissa bits) activations and weights through 3 blocks x 4 steps x 3 chunks


@torch.no_grad()
def test_fp8_dit_stays_near_bf16_and_replays_exactly_in_graphs():
    """speed.dit_precision=fp8: the blocks' linear layers become torchao fp8 tensors (the text K/V stay bf16),
    the rollout moves off bf16 by fp8's rounding and no more, and its CUDA graphs replay the eager fp8 path."""
    from model.wan.fp8 import fp8_matmuls, fp8_unsupported

    if fp8_unsupported(torch.device("cuda")):
        pytest.skip(fp8_unsupported(torch.device("cuda")))
    model = small_model()
    noise, ctx = inputs(1)
    plain = roll(model, model, noise, ctx)
    names = fp8_matmuls(model)
    block = model.blocks[0]
    assert len(names) == 8 * SMALL["num_layers"]
    assert "Float8" in type(block.attn1.to_q.weight).__name__ and "Float8" in type(block.ffn.net[2].weight).__name__
    assert type(block.attn2.to_k.weight) in (torch.Tensor, torch.nn.Parameter)
    model.set_fused_elementwise(True)
    graphs = ChunkGraphs(model)
    kv = KVCache.for_model(model, CausalPattern(3), batch_size=2, latent_hw=(30, 52), max_frames=9)
    cross = CrossAttnCache(model.config.num_layers)
    eager = roll(model, model, noise, ctx, kv, cross)
    err = rel_err(eager, plain)
    for _ in range(2):  # captured, then replayed
        replayed = roll(graphs, model, noise, ctx, kv, cross)
        print(f"fp8 DiT: rollout max rel err vs bf16 {err:.2e}, mean abs "
              f"{(eager.float() - plain.float()).abs().mean().item():.2e}; graphs vs eager {rel_err(replayed, eager):.1e}")
        assert rel_err(replayed, eager) <= 1e-6
    assert eager.isfinite().all() and 0 < err <= FP8_TOL


@torch.no_grad()
def test_vae_levers_match_plain_decode(tiny_wan_folder):
    vae = WanVAE(str(tiny_wan_folder), dtype="bfloat16", device="cuda")
    latents = torch.randn(1, 6, 4, 30, 52, generator=torch.Generator("cuda").manual_seed(0), device="cuda")

    def streamed():
        decoder = vae.stream_decoder(1)
        return torch.cat([decoder.decode(latents[:, :3]), decoder.decode(latents[:, 3:])], dim=1)

    plain = streamed()
    floor = bf16_decode_floor(tiny_wan_folder, latents)
    for setters in (("set_stacked_convs",), ("set_implicit_padding", "set_fused_blocks", "set_fused_upsample")):
        vae.set_channels_last(True)
        vae.set_fused_norms(True)
        for setter in setters:
            getattr(vae, setter)(True)
        torch.backends.cudnn.benchmark = True
        try:
            fast = streamed()
        finally:
            torch.backends.cudnn.benchmark = False
            for setter in ("set_channels_last", "set_fused_norms", *setters):
                getattr(vae, setter)(False)
        err = rel_err(fast, plain)
        print(f"VAE channels-last + fused norms + {' + '.join(setters)} + cudnn.benchmark: max rel err {err:.2e} "
              f"(bf16 vs fp32: {floor:.2e})")
        assert err <= max(BF16_TOL, 2 * floor)


@torch.no_grad()
def test_generate_with_every_lever_matches_plain(tiny_wan_folder):
    items = [Item(0, "a red circle moving left", 0, "a"), Item(1, "a blue square", 1, "b")]

    def student(on: bool) -> Student:
        torch.manual_seed(0)
        generator = randomize(WanDiT(**{**TRANSFORMER, "attention_head_dim": 64}), seed=3)
        generator = generator.to("cuda", torch.bfloat16).eval().requires_grad_(False)
        vae = WanVAE(str(tiny_wan_folder), dtype="bfloat16", device="cuda")
        text = WanTextEncoder(str(tiny_wan_folder), text_len=8, dtype="bfloat16", device="cuda").eval()
        speed = SpeedSchema(**dict.fromkeys(LEVERS, on))
        if on:  # one attention kernel: FA4 where it runs, else cuDNN
            speed.fa4_attention, speed.cudnn_attention = not NO_FA4, bool(NO_FA4)
        runner, stream = apply_levers(generator, vae, resolve_levers(speed, torch.device("cuda")))
        cfg = MethodConfig(num_frame_per_block=3, num_training_frames=9)
        return Student(generator, text, vae, cfg, (4, 30, 52), runner=runner, decode_stream=stream)

    plain = generate(student(False), items, 9)
    floor = bf16_decode_floor(tiny_wan_folder, plain[0].cuda())
    fast_student = student(True)
    assert isinstance(fast_student.runner, ChunkGraphs) and fast_student.decode_stream is not None
    for _ in range(2):  # the second batch replays the graphs captured by the first
        fast = generate(fast_student, items, 9)
        lat_err, pix_err = rel_err(fast[0], plain[0]), rel_err(fast[1], plain[1])
        print(f"every lever vs plain: latents {lat_err:.2e}, pixels {pix_err:.2e}, timing {fast[2]}")
        assert lat_err <= BF16_TOL and pix_err <= max(BF16_TOL, 2 * floor) and fast[1].shape == plain[1].shape
