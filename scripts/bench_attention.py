"""Attention kernels at the Wan2.1-1.3B shapes of streaming inference and of training (a GPU tool).

For each shape, each available backend: forward (and forward + backward where training needs it)
time, TFLOP/s, and the largest difference from cuDNN's output and gradients, relative to their
largest magnitude. Backends: `cudnn` (SDPA pinned to cuDNN's fused attention), `flash` (SDPA's own
FlashAttention-2), `fa4` (flash-attn-4's CuTe kernels, `flash_attn.cute`, when installed).

  python scripts/bench_attention.py --out bench_attention.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.base import MethodConfig  # noqa: E402
from model.wan.attention import fa4_attention, fa4_available  # noqa: E402
from model.wan.text_encoder import WanTextEncoder  # noqa: E402
from scripts.make_random_wan_folder import WAN_1_3B  # noqa: E402
from engine.config import ModelSchema  # noqa: E402

def geometry() -> dict:
    """Wan2.1-1.3B's sizes, from the DiT config, the model's latent shape, the method's chunking and the
    text encoder's length (the configs the benchmarks run)."""
    _, p_h, p_w = WAN_1_3B["patch_size"]
    _, height, width = ModelSchema().latent_shape
    method = MethodConfig()
    heads, head_dim = WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"]
    return {"heads": heads, "head_dim": head_dim, "dim": heads * head_dim, "ffn": WAN_1_3B["ffn_dim"],
            "tokens_per_frame": (height // p_h) * (width // p_w), "chunk_frames": method.num_frame_per_block,
            "clip_frames": method.num_training_frames,
            "text_tokens": inspect.signature(WanTextEncoder).parameters["text_len"].default}


def shapes(g: dict) -> list[tuple[str, int, int, bool]]:
    """(name, query tokens, key tokens, with backward) of the attention calls worth timing."""
    chunk, clip, tokens = g["chunk_frames"], g["clip_frames"], g["tokens_per_frame"]
    out = [(f"inference chunk {i} ({chunk} frames over {(i + 1) * chunk})", chunk * tokens, (i + 1) * chunk * tokens, False)
           for i in (0, 1, 2)]
    out.append((f"cross-attention ({chunk} frames over {g['text_tokens']} text tokens)", chunk * tokens, g["text_tokens"], False))
    last = clip // chunk - 1
    out += [(f"inference chunk {i} ({chunk} frames over {(i + 1) * chunk})", chunk * tokens, (i + 1) * chunk * tokens, False)
            for i in (last // 2, last)]
    out.append((f"training chunk {last} with grad ({chunk} over {clip})", chunk * tokens, clip * tokens, True))
    out.append((f"training whole clip ({clip} over {clip})", clip * tokens, clip * tokens, True))
    return out


def backends() -> dict:
    """name -> f(q, k, v) on [B, L, H, D] tensors."""

    def sdpa(kind):
        def run(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return run

    out = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    if fa4_available():  # the project's op (model/wan/attention.py), its backward included
        out["fa4"] = lambda q, k, v: fa4_attention(q, k, v)[0]
    return out


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def graph_check(fn, device, g: dict) -> float:
    """Capture fn in a CUDA graph, replay it on new inputs (a second chunk's shapes), and compare with an eager call."""
    tokens = g["chunk_frames"] * g["tokens_per_frame"]
    q, k, v = (torch.randn(1, n, g["heads"], g["head_dim"], device=device, dtype=torch.bfloat16)
               for n in (tokens, 2 * tokens, 2 * tokens))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        fn(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fn(q, k, v)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    with torch.no_grad():
        return rel(out, fn(q, k, v))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    kernels = backends()
    g = geometry()
    heads, head_dim = g["heads"], g["head_dim"]
    rows = []
    for name, lq, lk, backward in shapes(g):
        gen = torch.Generator(device).manual_seed(0)
        q = torch.randn(1, lq, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, lk, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, lk, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        grad = torch.randn(1, lq, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        flops = 4 * lq * lk * heads * head_dim
        reference = None
        for backend, fn in kernels.items():
            row = {"shape": name, "backend": backend, "lq": lq, "lk": lk}
            try:
                with torch.no_grad():
                    out = fn(q, k, v)
                    row["fwd_ms"] = timed(lambda: fn(q, k, v), args.repeats) * 1e3
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                grads = None
                if backward:
                    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

                    def step():
                        o = fn(qq, kk, vv)
                        return torch.autograd.grad(o, (qq, kk, vv), grad)

                    grads = step()
                    row["fwd_bwd_ms"] = timed(step, max(args.repeats // 4, 3)) * 1e3
                    row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9  # backward = 2.5 forwards
                if reference is None:
                    reference = (out, grads)
                else:
                    row["out_rel_err_vs_cudnn"] = rel(out, reference[0])
                    if grads is not None:
                        row["grad_rel_err_vs_cudnn"] = max(rel(a, b) for a, b in zip(grads, reference[1]))
            except Exception as e:  # a backend that cannot run this shape: say so, measure the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}
    if "fa4" in kernels:
        result["fa4_cuda_graph_rel_err"] = graph_check(kernels["fa4"], device, g)
        print("fa4 in a CUDA graph, replay vs eager:", result["fa4_cuda_graph_rel_err"])
    print("| shape | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | out err | grad err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['backend']} | failed: {r['error'][:120]} |")
            continue
        print(f"| {r['shape']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
              f"{r.get('fwd_bwd_ms', float('nan')):.3f} | {r.get('fwd_bwd_tflops', float('nan')):.0f} | "
              f"{r.get('out_rel_err_vs_cudnn', 0):.1e} | {r.get('grad_rel_err_vs_cudnn', float('nan')):.1e} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
