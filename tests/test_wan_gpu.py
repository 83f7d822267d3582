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
