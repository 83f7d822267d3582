"""GPU checks of the backbone (run on the device machine): FlexAttention block-causal == KV-cache chunks."""

import pytest
import torch

from model.wan.attention import CausalPattern
from model.wan.transformer import WanDiT
from scripts.bench_backbone import chunked
from tests.wan_tiny import TINY, tiny_diffusers

pytestmark = pytest.mark.gpu

SMALL = {**TINY, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256, "num_layers": 3}


def model_on_gpu(dtype):
    model = WanDiT(**SMALL)
    model.load_state_dict(tiny_diffusers(seed=0, **SMALL).state_dict())
    return model.to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(
    "pattern",
    [CausalPattern(3), CausalPattern(3, True), CausalPattern(1, False, 4, 1)],
    ids=str,
)
def test_flex_block_causal_matches_chunks_on_gpu(dtype, tol, pattern):
    torch.manual_seed(0)
    model = model_on_gpu(dtype)
    frames = 10 if pattern.independent_first_frame else 9
    x = torch.randn(2, frames, 4, 30, 52, device="cuda", dtype=dtype)  # 390 tokens a frame: not a multiple of 128
    t = torch.rand(2, frames, device="cuda") * 1000
    ctx = torch.randn(2, 7, SMALL["text_dim"], device="cuda", dtype=dtype)
    with torch.no_grad():
        whole = model(x, t, ctx, causal=pattern).float()
        chunks = chunked(model, pattern, x, t, ctx).float()
    err = ((chunks - whole).abs().max() / whole.abs().max()).item()
    print(f"{dtype} {pattern}: chunked vs whole-clip max rel err {err:.2e}")
    assert err <= tol


def test_flex_block_causal_backward_matches_dense_mask():
    torch.manual_seed(0)
    model = model_on_gpu(torch.float32).train()
    pattern = CausalPattern(3)
    x = torch.randn(1, 6, 4, 16, 16, device="cuda")
    t = torch.rand(1, 6, device="cuda") * 1000
    ctx = torch.randn(1, 5, SMALL["text_dim"], device="cuda")
    model(x, t, ctx, causal=pattern).square().mean().backward()
    flex = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cpu = model.to("cpu")
    cpu(x.cpu(), t.cpu(), ctx.cpu(), causal=pattern).square().mean().backward()
    worst = max(((flex[n].cpu() - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in cpu.named_parameters())
    print(f"flex (GPU) vs dense-mask SDPA (CPU) gradients: max rel err {worst:.2e}")
    assert worst <= 1e-3


def test_fa4_gradients_match_cudnn_and_save_attention_keeps_its_output(monkeypatch):
    from model.wan.attention import fa4_supported

    if fa4_supported(torch.device("cuda")):
        pytest.skip(fa4_supported(torch.device("cuda")))
    import flash_attn.cute

    calls = [0]
    real = flash_attn.cute.flash_attn_func

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_attn.cute, "flash_attn_func", counted)
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, 30, 52, device="cuda", dtype=torch.bfloat16)  # 2,340 tokens: FA4 for self-attention
    t = torch.rand(1, 6, device="cuda") * 1000
    ctx = torch.randn(1, 7, SMALL["text_dim"], device="cuda", dtype=torch.bfloat16)
    grads = {}
    for backend, policy in (("cudnn", "save_attention"), ("fa4", "full"), ("fa4", "save_attention")):
        model = model_on_gpu(torch.bfloat16).train()
        model.set_attention_backend(backend)
        model.enable_gradient_checkpointing()
        model.checkpoint_policy = policy
        calls[0] = 0
        model(x, t, ctx).float().square().mean().backward()
        grads[backend, policy] = ({n: p.grad.float() for n, p in model.named_parameters()}, calls[0])
    reference = grads["cudnn", "save_attention"][0]
    for key in (("fa4", "full"), ("fa4", "save_attention")):
        # per parameter ||g - g_cudnn|| / ||g_cudnn||, the worst one: both kernels round in bf16
        worst = max(((g - reference[n]).norm() / reference[n].norm()).item() for n, g in grads[key][0].items())
        print(f"{key}: gradients vs cuDNN, worst relative norm error {worst:.2e}, FA4 forward calls {grads[key][1]}")
        assert worst <= 2e-2
    layers = SMALL["num_layers"]
    assert grads["fa4", "full"][1] == 2 * layers  # recomputed in the backward
    assert grads["fa4", "save_attention"][1] == layers  # kept by the checkpointing policy
