"""How precise can the toy student get with a perfect learning signal? (a diagnostic for the toy world)

The generator is trained exactly as self forcing trains it (its own rollouts, the same exit steps,
gradient window and noise draws), but the loss is the ground truth instead of a distribution-matching
estimate: the mean squared error between each rolled-out clip and the nearest template of its own
prompt. No critic and no teacher are involved, so this bounds what DMD or SiD could reach with the
same network, budget and optimiser: if this oracle does not get within a distance (the match radius, or
an absolute data.metrics.match_threshold), a better distillation signal will not either.

  python scripts/toy_capacity_probe.py --steps 300                       # the toy default's network and budget
  python scripts/toy_capacity_probe.py --steps 300 --beta1 0.9 model.backbone.ffn_dim=512   # Hydra overrides

Prints the match rate and mean distance (utils/toy_metrics.py, 12 frames, the evaluation's prompts
and noise) every --eval-every steps and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402

from model.toy.world import ToyWorld  # noqa: E402
from engine.build import build_method  # noqa: E402
from utils.data import Batches  # noqa: E402
from utils.distributed import pick_device  # noqa: E402
from engine.config import compose_checked  # noqa: E402
from engine.evaluation import sample  # noqa: E402
from utils.toy_metrics import evaluate, match_rule, pairwise_distance  # noqa: E402

def oracle_loss(video: torch.Tensor, prompts: list[str], world: ToyWorld,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of clips [B, F, C, H, W] to the nearest template of each clip's own prompt (frames in mask)."""
    templates, template_prompt = world.all_templates(video.shape[1])
    templates = templates.to(video.device, video.dtype)
    own = torch.tensor([world.prompt_index(p) for p in prompts])
    with torch.no_grad():
        d = pairwise_distance(video.detach(), templates).masked_fill(template_prompt[None] != own[:, None], float("inf"))
        target = templates[d.argmin(dim=1).to(video.device)]
    if mask is not None:
        video, target = video[:, mask], target[:, mask]
    return torch.nn.functional.mse_loss(video, target)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default: optim.generator.lr of the config")
    p.add_argument("--beta1", type=float, default=None, help="default: optim.generator.betas[0] of the config")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = p.parse_args(argv)
    cfg = compose_checked(args.overrides)
    if cfg.data.world.get("_target_") != "model.toy.world.ToyWorld":
        raise SystemExit("the capacity probe needs the toy world (data=toy model=toy)")
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, device)
    world = method.real_score.world
    optim = cfg.optim.generator
    betas = (optim.betas[0] if args.beta1 is None else args.beta1, optim.betas[1])
    opt = torch.optim.AdamW(method.generator.parameters(), lr=args.lr or optim.lr, betas=betas,
                            weight_decay=optim.weight_decay)
    batches = Batches(instantiate(cfg.data.prompts), cfg.batch_size, 1, 1)
    eval_prompts = [q for q in world.prompts for _ in range(cfg.data.metrics.samples_per_prompt)]
    start, history = time.time(), []

    def evaluate_now(step: int) -> None:
        method.generator.eval()
        clips = sample(method, method.generator, eval_prompts, cfg.method.num_training_frames, cfg.seed)
        scores = evaluate(clips, eval_prompts, world, **match_rule(cfg.data.metrics))
        method.generator.train()
        history.append({"step": step, "match_rate": scores["match_rate"], "mean_distance": scores["mean_distance"]})
        print(f"step {step}: match rate {scores['match_rate']:.3f}, mean distance {scores['mean_distance']:.3f} "
              f"({time.time() - start:.0f} s)", flush=True)

    evaluate_now(0)
    for step in range(args.steps):
        ids, batch = batches.get(step, 0, 0)
        method.reseed(cfg.seed, step, "generator", ids)
        video, mask, _ = method.generate(batch)
        loss = oracle_loss(video, batch["prompts"], world, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.generator.parameters(), optim.grad_clip)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate_now(step + 1)
    result = {"steps": args.steps, "lr": args.lr or optim.lr, "betas": list(betas), "overrides": args.overrides,
              "history": history}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
