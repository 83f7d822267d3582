"""Make the teacher's ODE pairs for ODE regression (experiment=ode_init), sharded across ranks.

For every item: noise from the item's own stream (seed, item index), the teacher's Euler sampler
over `method.ode_steps` shifted steps plus the student's warped steps (so the states there are
exact, pipeline/ode.py), Wan's CFG v_u + g (v_c - v_u) with g = method.ode_guidance_scale and the
unconditional branch on method.negative_prompt; stored: the states at the student's steps and the
teacher's final clip, "ode" [S+1, F, C, H, W], in shards that utils/data.py ODEPairShards reads.

The teacher is the run's real score, built by build_method from the same Hydra config as training
(`model=...` selects it: the 1.3B or 14B Wan folder, or the toy world's exact teacher), so the
pairs match the run that trains on them. Every rank writes its own shards (shard k goes to rank
k mod world size); items do not depend on the world size, and finished shards are kept, so a
killed job resumes at any size. One process is world size 1.

    python scripts/generate_ode_pairs.py --prompts prompts/vidprom.txt --out data/ode_pairs experiment=ode_init
    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --prompts prompts/vidprom.txt \\
        --out data/ode_pairs --num-samples 16000 experiment=ode_init model.path=/ckpt/Wan2.1-T2V-1.3B-Diffusers
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.ode_regression import ODERegression  # noqa: E402
from engine.build import DTYPES, build_method  # noqa: E402
from engine.config import compose_checked  # noqa: E402
from utils.data import PromptFile, fill_shards, placement, shard_script_parser  # noqa: E402
from utils.distributed import barrier, log0  # noqa: E402

PHASE = "ode_pairs"  # keys the noise streams, apart from training's generator / critic draws


class FloatEuler(torch.nn.Module):
    """The teacher computes in its own precision; the Euler state stays float32 (CausVid's pairs were float32)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.dtype = next((p.dtype for p in net.parameters()), None)  # None: the toy teacher has no weights

    def forward(self, x, timestep, context):
        return self.net(x if self.dtype is None else x.to(self.dtype), timestep, context).float()


def settings_of(cfg: DictConfig, method: ODERegression) -> dict:
    """What the pairs depend on, stored in every shard (ODEPairShards checks the training run against it)."""
    m = cfg.method
    teacher = cfg.model.teacher_path if cfg.model.teacher is None else cfg.model.teacher._target_
    return {
        "denoising_step_list": list(m.denoising_step_list), "warp_denoising_step": m.warp_denoising_step,
        "timestep_shift": m.timestep_shift, "timesteps": [float(t) for t in method.steps],
        "ode_steps": m.ode_steps, "ode_guidance_scale": m.ode_guidance_scale, "negative_prompt": m.negative_prompt,
        "num_frames": m.num_training_frames, "seed": cfg.seed, "teacher": str(teacher),
    }


def generate_ode_pairs(cfg: DictConfig, prompts: Sequence[str], out: str | Path, *, num_samples: int | None = None,
                       shard_size: int = 64, batch_size: int = 1, rank: int | None = None,
                       world_size: int | None = None, device: torch.device | None = None,
                       overwrite: bool = False) -> list[Path]:
    """Write this rank's shards of (prompt, ode) pairs under `out`; returns the files written.

    Item i pairs prompts[i mod len(prompts)] with noise stream (cfg.seed, i), so `num_samples`
    above the number of prompts gives several trajectories per prompt.
    """
    rank, world_size, device = placement(cfg, rank, world_size, device)
    built = build_method(cfg, device)
    # The run's networks, viewed as ODE regression for its teacher_trajectory (as engine/warm_start.py does).
    method = ODERegression(built.generator, FloatEuler(built.real_score), built.fake_score, built.text_encoder,
                           built.vae, built.cfg, built.latent_shape)
    num_samples = len(prompts) if num_samples is None else num_samples
    frames, dtype = cfg.method.num_training_frames, DTYPES[cfg.model.dtype]

    def make(start: int, end: int):
        chunks, texts = [], []
        for first in range(start, end, batch_size):
            ids = list(range(first, min(first + batch_size, end)))
            batch = [prompts[i % len(prompts)] for i in ids]
            method.reseed(cfg.seed, 0, PHASE, ids)
            chunks.append(method.teacher_trajectory(batch, frames).to(dtype).cpu())
            texts += batch
        return torch.cat(chunks), texts

    settings = settings_of(cfg, method)
    return fill_shards(out, num_samples, shard_size, rank, world_size, "ode", make, settings, overwrite, log0)


def main(argv=None) -> None:
    p = shard_script_parser(__doc__, "items", "trajectories sampled at once per GPU")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--num-samples", type=int, default=None, help="items (default: one per prompt)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = compose_checked(args.overrides)
    prompts = PromptFile(args.prompts)
    log0("ODE pairs of %s:\n%s", cfg.model.teacher_path, OmegaConf.to_yaml(cfg.method))
    with torch.no_grad():
        written = generate_ode_pairs(cfg, prompts, args.out, num_samples=args.num_samples, shard_size=args.shard_size,
                                     batch_size=args.batch_size, overwrite=args.overwrite)
    barrier()
    log0("rank 0 wrote %d shards; all ranks done: %s", len(written), args.out)


if __name__ == "__main__":
    main()
