"""Speed levers on the CPU (tiny sizes): the levers that exist here give the plain path's numbers,
caches are reused exactly across batches, and the CUDA-only levers refuse to run without CUDA."""

import pytest
import torch

from model.base import MethodConfig
from model.wan.attention import CausalPattern, attention, fa4_supported
from model.wan.kv_cache import CrossAttnCache, KVCache
from model.wan.text_encoder import WanTextEncoder
from model.wan.transformer import WanDiT
import model.wan.vae_layers as vae_layers
from model.wan.vae import WanVAE
from tests.wan_folder import TRANSFORMER, tiny_wan_folder  # noqa: F401  (a fixture)
from tests.wan_tiny import randomize
from engine.inference import Student, generate
from engine.items import Item
from utils.speed import SpeedSchema, apply_levers, resolve_levers

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def student(folder, **levers) -> Student:
    torch.manual_seed(0)
    generator = randomize(WanDiT(**TRANSFORMER), seed=3).eval().requires_grad_(False)
    vae = WanVAE(str(folder), dtype="float32")
    text = WanTextEncoder(str(folder), text_len=8, dtype="float32").eval()
    runner, stream = apply_levers(generator, vae, resolve_levers({**vars(SpeedSchema()), **levers}, CPU))
    cfg = MethodConfig(num_frame_per_block=2, num_training_frames=4)
    return Student(generator, text, vae, cfg, (4, 8, 8), runner=runner, decode_stream=stream)


def test_levers_default_off_on_cpu_and_cuda_only_levers_refuse_it():
    auto = SpeedSchema(**dict.fromkeys(vars(SpeedSchema()), None))
    assert not any(resolve_levers(auto, CPU).values())
    on_cuda = resolve_levers(auto, torch.device("cuda"))
    assert on_cuda.pop("dit_fp8") is False  # fp8 is not exact: only when asked for
    # one attention lever: FA4 where it runs (package and GPU), else cuDNN
    fa4_runs = fa4_supported(torch.device("cuda")) is None
    assert on_cuda.pop("fa4_attention") == fa4_runs and on_cuda.pop("cudnn_attention") == (not fa4_runs)
    assert all(on_cuda.values())
    # a kernel named by the model: the attention levers stay off when automatic, and true is a conflict
    for backend in ("flash_attn", "cudnn"):
        levers = resolve_levers(auto, torch.device("cuda"), backend)
        assert not levers["cudnn_attention"] and not levers["fa4_attention"]
    open_kernel = resolve_levers(auto, torch.device("cuda"), "auto")  # "auto" leaves the kernel to the levers
    assert open_kernel["cudnn_attention"] or open_kernel["fa4_attention"]
    with pytest.raises(ValueError, match="model.attention_backend=flash_attn"):
        resolve_levers(SpeedSchema(cudnn_attention=True), torch.device("cuda"), "flash_attn")
    for lever in ("cudnn_attention", "fa4_attention", "cuda_graphs", "cudnn_benchmark", "decode_stream"):
        with pytest.raises(ValueError, match=f"speed.{lever}=true needs a CUDA device"):
            resolve_levers(SpeedSchema(**{lever: True}), CPU)
    levers = resolve_levers(SpeedSchema(fused_elementwise=True, vae_channels_last=True), CPU)
    assert levers["fused_elementwise"] and levers["vae_channels_last"] and not levers["cuda_graphs"]


def test_dit_fp8_is_asked_for_and_refuses_what_cannot_run_it():
    """speed.dit_precision: bf16 (and null) leave the DiT alone, a typo and fp8 without fp8 arithmetic are
    one-line errors naming the key; fp8_matmuls picks every block linear layer but the text K/V (the GPU test
    in tests/test_speed_gpu.py runs them)."""
    from model.wan.fp8 import fp8_layers

    for value in ("bf16", None):
        assert resolve_levers(SpeedSchema(dit_precision=value), CPU)["dit_fp8"] is False
    with pytest.raises(ValueError, match=r"^speed.dit_precision=fp16: expected one of \['bf16', 'fp8'\]$"):
        resolve_levers(SpeedSchema(dit_precision="fp16"), CPU)
    with pytest.raises(ValueError, match=r"^speed.dit_precision=fp8 needs a GPU with fp8 arithmetic .* on cpu; use bf16$"):
        resolve_levers(SpeedSchema(dit_precision="fp8"), CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="on a machine without CUDA; use bf16$"):
            resolve_levers(SpeedSchema(dit_precision="fp8"), torch.device("cuda"))
    names = fp8_layers(WanDiT(**TRANSFORMER))
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                 "ffn.net.0.proj", "ffn.net.2"]
    assert names == [f"blocks.{i}.{n}" for i in range(TRANSFORMER["num_layers"]) for n in per_block]


def test_cudnn_attention_refuses_cpu_tensors():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="'cudnn' runs on CUDA"):
        attention(q, q, q, "cudnn")
    with pytest.raises(ValueError, match="'fa4' runs on CUDA"):
        attention(q, q, q, "fa4")


def test_fa4_without_its_package_fails_clearly(monkeypatch):
    import model.wan.attention as attn

    monkeypatch.setattr(attn, "_has_module", lambda name: False)  # as on a machine without flash-attn-4
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        resolve_levers(SpeedSchema(fa4_attention=True), torch.device("cuda"))
    assert not resolve_levers(SpeedSchema(fa4_attention=None), torch.device("cuda"))["fa4_attention"]
    with pytest.raises(ValueError, match="attention backend 'fa4' was selected but the flash-attn-4 package"):
        WanDiT(**TRANSFORMER).set_attention_backend("fa4")
    monkeypatch.setattr(attn, "_has_module", lambda name: name == "flash_attn.cute")  # installed, but a CPU model
    with pytest.raises(ValueError, match="FlashAttention-4 runs on CUDA GPUs, not on cpu"):
        WanDiT(**TRANSFORMER).set_attention_backend("fa4")
    assert not attn.flash_attn_available()  # flash-attn-4 alone is no flash-attn 2


def test_fused_feed_forward_is_the_module_where_the_epilogue_cannot_run():
    from model.wan.fused import feed_forward

    block = randomize(WanDiT(**TRANSFORMER), seed=1).blocks[0]
    h = torch.randn(2, 5, TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"])
    with torch.no_grad():  # on the CPU, torch._addmm_activation's GELU is erf, not Wan's tanh: the module runs
        assert torch.equal(feed_forward(block.ffn, h, fused=True), block.ffn(h))
    # with grad (training) the module runs too: the epilogue has no backward
    assert torch.equal(feed_forward(block.ffn, h, fused=True), block.ffn(h))


def test_vae_channels_last_stream_decode_equals_plain(tiny_wan_folder, monkeypatch):
    # the fused blocks' functions uncompiled (compiling on a 2-core CPU takes a minute; the GPU test compiles)
    monkeypatch.setattr(vae_layers, "_compiled_bias_norm_silu", vae_layers.bias_norm_silu)
    monkeypatch.setattr(vae_layers, "_compiled_bias_residual", vae_layers.bias_residual)
    monkeypatch.setattr(vae_layers, "_compiled_bias_norm_silu_into", vae_layers.bias_norm_silu_into)
    monkeypatch.setattr(vae_layers, "_compiled_upsample_frames", vae_layers.upsample_frames)
    vae = WanVAE(str(tiny_wan_folder), dtype="float32")
    latents = torch.randn(1, 5, 4, 6, 10, generator=torch.Generator().manual_seed(0))

    def streamed():
        decoder = vae.stream_decoder(1)
        # a 1-frame call first: the caches start with one frame, as in a rollout's first chunk
        return torch.cat([decoder.decode(latents[:, :1]), decoder.decode(latents[:, 1:3]), decoder.decode(latents[:, 3:])], dim=1)

    plain = streamed()
    for setter in ("set_implicit_padding", "set_fused_blocks", "set_fused_upsample"):  # alone, then with channels-last
        for channels_last in (False, True):
            vae.set_channels_last(channels_last)
            getattr(vae, setter)(True)
            fast = streamed()
            getattr(vae, setter)(False)
            err = ((fast - plain).abs().max() / plain.abs().max()).item()
            assert err <= 1e-5, (setter, channels_last, err)
    # the fused blocks skipped zero time taps: two at the first frame, one at the second before time upsampling
    assert {c._trimmed[0][0] for c in vae.model.decoder.modules() if getattr(c, "_trimmed", None)} == {1, 2}
    vae.set_channels_last(False)
    for setter in ("set_channels_last", "set_stacked_convs"):  # each alone, then both
        getattr(vae, setter)(True)
        fast = streamed()
        err = ((fast - plain).abs().max() / plain.abs().max()).item()
        assert plain.shape == (1, 17, 3, 48, 80) and err <= 1e-5, (setter, err)
    assert vae.model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    vae.set_channels_last(False)
    fast = streamed()
    vae.set_stacked_convs(False)
    assert ((fast - plain).abs().max() / plain.abs().max()).item() <= 1e-5
    # the fused norm's function, uncompiled, is diffusers' norm + SiLU exactly
    block = vae.model.decoder.mid_block.resnets[0]
    x = torch.randn(1, block.norm1.gamma.shape[0], 2, 6, 10)
    assert torch.equal(vae_layers.rms_norm_silu(x, block.norm1.gamma, block.norm1.bias, block.norm1.scale),
                       block.nonlinearity(block.norm1(x)))


def test_vae_upsamples_in_its_own_dtype_exactly(tiny_wan_folder):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    vae = WanVAE(str(tiny_wan_folder), dtype="bfloat16")
    ups = [m for m in vae.model.modules() if isinstance(m, WanUpsample)]
    assert ups and all(type(m) is vae_layers.NearestUpsample for m in ups)
    x = torch.randn(2, 8, 5, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = ups[0](x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, WanUpsample.forward(ups[0], x))


def two_chunks(model, x, t, ctx, kv, cross, prefill: bool) -> torch.Tensor:
    """Frames 0-1 and 2-3 of x as two chunk calls through fresh caches; the text K/V filled up front
    (prefill) or stored by the first chunk call."""
    kv.reset()
    cross.reset()
    if prefill:
        model.fill_crossattn_cache(ctx, cross)
    return torch.cat([model(x[:, f : f + 2], t[:, f : f + 2], ctx, kv_cache=kv, frame_offset=f, crossattn_cache=cross)
                      for f in (0, 2)], dim=1)


def test_filled_cross_cache_and_reused_memory_give_the_same_chunks():
    torch.manual_seed(0)
    model = randomize(WanDiT(**TRANSFORMER), seed=1).eval()
    pattern = CausalPattern(2)
    x = torch.randn(2, 4, 4, 6, 8)
    t = torch.rand(2, 4) * 1000
    contexts = [torch.randn(2, 5, TRANSFORMER["text_dim"]) for _ in range(2)]
    kv = KVCache.for_model(model, pattern, batch_size=2, latent_hw=(6, 8), max_frames=4)
    cross = CrossAttnCache(model.config.num_layers)

    def chunks(ctx, prefill: bool):
        return two_chunks(model, x, t, ctx, kv, cross, prefill)

    with torch.no_grad():
        first = chunks(contexts[0], prefill=False)  # the first chunk call stores the text K/V
        pointers = (cross.context.data_ptr(), cross.kv[0][0].data_ptr(), cross.kv[1][1].data_ptr())
        second = chunks(contexts[1], prefill=True)  # another prompt batch, copied into the same memory
        assert (cross.context.data_ptr(), cross.kv[0][0].data_ptr(), cross.kv[1][1].data_ptr()) == pointers
        again = chunks(contexts[0], prefill=True)
        whole = model(x, t, contexts[1], causal=pattern)
    assert torch.equal(again, first)
    assert not torch.allclose(second, first)
    assert ((second - whole).abs().max() / whole.abs().max()).item() <= 1e-5


def test_generate_reuses_its_caches_exactly(tiny_wan_folder):
    items = [[Item(0, "a red circle moving left", 0, "a"), Item(1, "a blue square", 1, "b")],
             [Item(2, "a cat on the street", 5, "c"), Item(3, "a green car moving up", 7, "d")]]
    kept = student(tiny_wan_folder)
    for batch in items:
        latents, pixels, timing = generate(kept, batch, 4)
        fresh_latents, fresh_pixels, _ = generate(student(tiny_wan_folder), batch, 4)
        assert torch.equal(latents, fresh_latents) and torch.equal(pixels, fresh_pixels)
        assert pixels.shape == (2, 13, 3, 64, 64) and 0 < timing["first_chunk_s"] <= timing["seconds"]


def test_compact_text_keeps_the_cross_attention_and_fills_fewer_keys():
    from model.wan.kv_cache import compact_text

    torch.manual_seed(0)
    model = randomize(WanDiT(**TRANSFORMER), seed=1).eval()
    pattern = CausalPattern(2)
    x, t = torch.randn(2, 4, 4, 6, 8), torch.rand(2, 4) * 1000
    # Wan's text encoder output: each prompt's tokens (5 and 9 here), zeros after them, 40 positions
    context = torch.randn(2, 40, TRANSFORMER["text_dim"])
    context[0, 5:] = 0
    context[1, 9:] = 0
    kv = KVCache.for_model(model, pattern, batch_size=2, latent_hw=(6, 8), max_frames=4)
    cross = CrossAttnCache(model.config.num_layers)

    def chunks(compact: bool, prefill: bool):
        model.set_compact_text(compact, bucket=8)
        return two_chunks(model, x, t, context, kv, cross, prefill)

    with torch.no_grad():
        plain = chunks(False, prefill=True)
        assert cross.text_bias is None and cross.kv[0][0].shape[1] == 40
        for prefill in (True, False):  # filled up front, or by the first chunk call
            compact = chunks(True, prefill)
            assert cross.kv[0][0].shape[1] == 16 and cross.text_bias.shape == (2, 16)  # 9 + 3 rows, bucket 8
            assert ((compact - plain).abs().max() / plain.abs().max()).item() <= 1e-5
        assert torch.equal(chunks(False, prefill=False), plain)  # off again: the old bias is dropped
        assert cross.text_bias is None
    # the padding's weight, split over three bf16 logits, is N to within 3e-5 (one bf16 logit: up to 1.6%)
    for n in (1, 4, 100, 497, 509):
        text = torch.zeros(1, 512, 8, dtype=torch.bfloat16)
        text[0, : 512 - n] = 1
        packed = compact_text(text)
        if 512 - n + 3 > 448:  # no bucket of 64 below 512 holds the prompt and the three rows
            assert packed is None
            continue
        compact, bias = packed
        rows = bias[0, 512 - n : 512 - n + 3].double()
        assert torch.equal(compact[0, : 512 - n], text[0, : 512 - n]) and not compact[0, 512 - n :].any()
        assert (bias[0, : 512 - n] == 0).all() and torch.isneginf(bias[0, 512 - n + 3 :]).all()
        assert abs(rows.exp().sum().item() / n - 1) <= 3e-5, (n, rows)
    assert compact_text(torch.ones(2, 512, 8)) is None  # no padding: nothing to fold


def test_bench_inference_runs_tiny_on_the_cpu(tmp_path):
    """scripts/bench_inference.py --tiny --device cpu: the benchmark's own path (build, every part timed, errors
    against plain) stays runnable without a GPU; the CPU's default levers are the plain path, so its error is 0."""
    import json

    from scripts.bench_inference import configurations, main

    out = tmp_path / "bench.json"
    main(["--tiny", "--device", "cpu", "--repeats", "1", "--warmup", "1", "--frames", "3", "--configs", "plain,default",
          "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["config"] for r in result["rows"]] == ["plain", "default"] and result["device"] == "cpu"
    for row in result["rows"]:
        assert row["frames"] == 9 and row["fps"] > 0 and row["dit_s"] > 0 and row["vae_s"] > 0
        assert row["latents_rel_err"] == 0 and row["pixels_rel_err"] == 0
    assert result["dit_flops"] > 0 and result["vae_flops"] > 0
    (name, levers), = configurations(["default+dit_fp8-decode_stream"], CPU)
    assert levers["dit_fp8"] and not levers["decode_stream"]
    with pytest.raises(ValueError, match=r"unknown configuration 'default\+fp9'"):
        configurations(["default+fp9"], CPU)
