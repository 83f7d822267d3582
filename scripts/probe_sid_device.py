"""Why SiD behaves differently on the GPU: its generator gradient on the CPU and on CUDA for the same
weights and the same draws, and the exact teacher's input gradient against a finite difference.

    python scripts/probe_sid_device.py                 # on a machine with CUDA; prints JSON
    python scripts/probe_sid_device.py --no-tf32       # with TF32 off in cuDNN and matmuls

SiD differentiates through both score networks with respect to their input, so anything that makes
a score's output less precise on one device (TF32 convolutions, another reduction order) lands in
its generator gradient, while DMD's gradient uses the scores' outputs only. The draws are made on
the CPU and moved, so both devices see the same noise; the weights are the toy default's
(assets/toy), so both devices start from the same generator and critic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.build import build_method  # noqa: E402
from engine.config import compose_checked  # noqa: E402
from utils.sample_rng import SampleRNG  # noqa: E402


class CPUDraws:
    """A SampleRNG whose draws are made on the CPU and moved: the same numbers on every device."""

    def __init__(self, rng: SampleRNG, device: torch.device):
        self.rng, self.device = rng, device

    def randn(self, shape, dtype=torch.float32):
        return self.rng.randn(shape, dtype).to(self.device)

    def randn_like(self, x):
        return self.rng.randn(x.shape, x.dtype).to(x.device)

    def randint(self, low, high, shape):
        return self.rng.randint(low, high, shape).to(self.device)


def generator_gradient(method, prompts: list[str], seed: int, step: int) -> tuple[dict, dict]:
    """SiD's generator loss and gradient for one batch, with CPU-made draws."""
    method.reseed(seed, step, "generator", list(range(len(prompts))))
    method.rng = CPUDraws(SampleRNG.for_samples(seed, step, "generator", list(range(len(prompts))), "cpu"),
                          method.device)
    method.generator.zero_grad(set_to_none=True)
    loss, logs = method.generator_loss({"prompts": prompts})
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in method.generator.named_parameters() if p.grad is not None}
    return grads, {k: float(v) for k, v in logs.items()} | {"loss": float(loss)}


def teacher_fd_error(method, prompts: list[str], seed: int, eps: float = 1e-6) -> float:
    """Relative error of the exact teacher's input gradient against a central difference (float64)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = method.latent_shape
    frames = method.cfg.num_training_frames
    x = torch.randn((len(prompts), frames, c, h, w), generator=g, dtype=torch.float64).to(method.device)
    d = torch.randn(x.shape, generator=g, dtype=torch.float64).to(method.device)
    probe = torch.randn(x.shape, generator=g, dtype=torch.float64).to(method.device)
    t = torch.full((len(prompts), frames), 500.0, dtype=torch.float64, device=method.device)
    context = method.encode(prompts).double()

    def f(x_):
        return (method.real_score(x_, t, context) * probe).sum()

    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    with torch.no_grad():
        fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
    analytic = (grad * d).sum()
    return abs(float(analytic - fd)) / max(abs(float(fd)), 1e-30)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-tf32", action="store_true", help="TF32 off in cuDNN and matmuls (torch's CPU default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (default: method=sid)")
    args = p.parse_args(argv)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cfg = compose_checked(["method=sid", *args.overrides])
    from model.toy.world import PROMPTS

    prompts = list(PROMPTS[: args.batch])
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result: dict = {"tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}
    grads = {}
    for device in devices:
        torch.manual_seed(cfg.seed)
        method = build_method(cfg, device)
        grads[device.type], logs = generator_gradient(method, prompts, args.seed, 0)
        result[device.type] = {"logs": logs, "teacher_fd_rel_err": teacher_fd_error(method, prompts, args.seed),
                               "grad_norm": float(torch.sqrt(sum((v * v).sum() for v in grads[device.type].values())))}
    if "cuda" in grads:
        a, b = grads["cpu"], grads["cuda"]
        diff = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a))
        norm = torch.sqrt(sum((a[n] ** 2).sum() for n in a))
        cos = sum((a[n] * b[n]).sum() for n in a) / (norm * torch.sqrt(sum((b[n] ** 2).sum() for n in b)))
        result["cpu_vs_cuda"] = {"grad_rel_err": float(diff / norm), "grad_cosine": float(cos)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
