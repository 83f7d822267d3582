"""Make the toy world's starting points, as the reference has them for Wan.

Self Forcing starts from (1) a generator initialised by ODE regression on the teacher's
trajectories and (2) a critic copied from the pretrained teacher. The toy world's teacher is exact
and has no weights, so this script makes both with the project's own losses:
  generator: ODE regression of the block-causal student on the exact teacher's ODE (model/ode_regression.py);
  critic:    a bidirectional toy "pretrained model": flow matching on the exact teacher's samples.
It writes assets/toy/ode_init.safetensors and assets/toy/denoiser.safetensors (+ a JSON report);
configs/model/toy.yaml starts from them. Run on a GPU it takes a few minutes:

  python scripts/toy_pretrain.py --steps 3000 --batch-size 64 --out assets/toy
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

import engine.config  # noqa: E402,F401
from engine.build import build_method, build_optimizer  # noqa: E402
from utils.data import Batches  # noqa: E402
from utils.distributed import pick_device  # noqa: E402
from engine.evaluation import sample  # noqa: E402
from utils.toy_metrics import evaluate  # noqa: E402
from engine.warm_start import WarmStart  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def save(method, out: Path, train: set[str]) -> None:
    """Write the trained networks (a network not trained keeps its file)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"generator": ("ode_init", method.generator), "critic": ("denoiser", method.fake_score)}
    for name, net in (files[k] for k in sorted(train)):
        weights = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(weights, str(out / f"{name}.safetensors.tmp"))
        (out / f"{name}.safetensors.tmp").replace(out / f"{name}.safetensors")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, help="write the weights every this many steps")
    p.add_argument("--out", default="assets/toy")
    p.add_argument("--resume", default=None, help="a folder with ode_init / denoiser .safetensors to continue from")
    p.add_argument("--generator-init", default=None,
                   help="start the generator from these weights (e.g. a denoiser, as Self Forcing starts its student from "
                        "the teacher's weights); overrides --resume for the generator")
    p.add_argument("--train", default="generator,critic",
                   help="which networks to train (comma-separated); the others are saved as loaded")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (model / data)")
    args = p.parse_args(argv)

    start_from = (["model.generator_init=" + str(Path(args.resume) / "ode_init.safetensors"),
                   "model.critic_init=" + str(Path(args.resume) / "denoiser.safetensors")] if args.resume
                  else ["model.generator_init=null", "model.critic_init=random"])
    if args.generator_init:
        start_from.append(f"model.generator_init={args.generator_init}")
    train = set(args.train.split(","))
    if not train or not train <= {"generator", "critic"}:
        raise SystemExit(f"--train takes generator and/or critic, got {args.train!r}")
    overrides = [*start_from, f"batch_size={args.batch_size}",
                 f"seed={args.seed}", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    device = pick_device(cfg)
    torch.manual_seed(args.seed)
    method = build_method(cfg, device)
    warm = WarmStart(method.generator, method.real_score, method.fake_score, method.text_encoder, method.vae,
                     method.cfg, method.latent_shape)
    from hydra.utils import instantiate

    batches = Batches(instantiate(cfg.data.prompts), args.batch_size, 1, 1)
    nets = {k: v for k, v in (("generator", method.generator), ("critic", method.fake_score)) if k in train}
    optim_cfg = cfg.warm_start.optim.copy()
    optim_cfg.lr, optim_cfg.schedule = args.lr, "cosine"
    optims = {k: build_optimizer(net.parameters(), optim_cfg, args.steps) for k, net in nets.items()}
    start, report = time.time(), {"args": vars(args), "device": str(device), "loss": {}}
    for step in range(args.steps):
        ids, batch = batches.get(step, 0, 0)
        warm.reseed(args.seed, step, "pretrain", ids)
        with torch.no_grad():  # one teacher trajectory serves both networks
            ode = warm.teacher_trajectory(batch["prompts"], cfg.method.num_training_frames)
        for phase, net in nets.items():
            if phase == "generator":
                loss, _ = warm.generator_loss({**batch, "ode": ode})
            else:  # critic
                loss, _ = warm.denoising_loss(ode[:, -1], warm.encode(batch["prompts"]))
            opt, sched = optims[phase]
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[p for p in net.parameters() if p.requires_grad])
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            report["loss"][phase] = loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: {report['loss']} ({time.time() - start:.0f} s)", flush=True)
        if (step + 1) % args.save_every == 0:
            save(method, Path(args.out), train)
    world = method.real_score.world
    prompts = [p for p in world.prompts for _ in range(cfg.data.metrics.samples_per_prompt)]
    clips = sample(method, method.generator.eval(), prompts, world.num_frames, args.seed)
    report["generator_eval"] = {k: v for k, v in evaluate(clips, prompts, world).items() if k != "coverage_per_prompt"}
    report["seconds"] = time.time() - start
    out = Path(args.out)
    save(method, out, train)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("loss", "seconds")}), report["generator_eval"]["match_rate"])


if __name__ == "__main__":
    main()
