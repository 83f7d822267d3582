"""An in-run warm start for teachers cheap enough to sample on the fly (the toy world's exact one).

The reference recipe starts distillation from an ODE-initialised generator and a critic copied
from the teacher. With a teacher that has no weights to copy, the same two starting points are
made here, before step 0: the generator regresses the teacher's ODE trajectories (ODE
regression, model/ode_regression.py) and the fake score learns to denoise the teacher's samples
(the flow-matching loss the critic uses during distillation).
"""

from __future__ import annotations

import torch

from model.base import SelfForcingModel
from model.contract import Phase
from model.ode_regression import ODERegression


class WarmStart(ODERegression):
    """ODE regression for the generator; flow matching on the teacher's samples for the critic."""

    networks = SelfForcingModel.networks
    phases = (Phase("generator", "generator_loss", ("generator",), data=("prompts|videos",)),
              Phase("critic", "critic_loss", ("critic",), data=("prompts|videos",)))

    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            clips = self.teacher_trajectory(batch["prompts"], self.cfg.num_training_frames)[:, -1]
        loss, logs = self.denoising_loss(clips, self.encode(batch["prompts"]))
        return loss, {"critic_loss": logs["critic_loss"]}


def warm_start(method, cfg, dist, data, accumulation: int, run_phase) -> None:
    """Run cfg.warm_start.{generator,critic}_steps updates with their own AdamW; log the last losses.

    `data` is the trainer's DataSources and `run_phase` its update (engine/trainer.py)."""
    from engine.build import build_optimizer
    from engine.trainer import Optimized
    from utils.distributed import log0

    ws = cfg.warm_start
    if ws.generator_steps <= 0 and ws.critic_steps <= 0:
        return
    networks = type(method).networks
    if not all(n in networks and networks[n].trained for n in ("generator", "critic")):
        raise ValueError(f"warm_start needs a trained generator and critic, which {type(method).__name__} does not "
                         "declare; set warm_start.generator_steps=0 and warm_start.critic_steps=0")
    warm = WarmStart(method.generator, method.real_score, method.fake_score, method.text_encoder, method.vae,
                     method.cfg, method.latent_shape)
    optim = cfg.warm_start.optim
    optimized = {name: Optimized(net, *build_optimizer(net.parameters(), optim, 1), optim)
                 for name, net in (("generator", method.generator), ("critic", method.fake_score))}
    logs: dict = {}
    for step in range(max(ws.generator_steps, ws.critic_steps)):
        for phase, steps in zip(WarmStart.phases, (ws.generator_steps, ws.critic_steps)):
            if step < steps:
                logs.update(run_phase(warm, phase, optimized, data, -1 - step, cfg.seed, dist, accumulation))
    log0("warm start: %d generator and %d critic updates; last losses %s", ws.generator_steps, ws.critic_steps,
         {k: round(v, 4) for k, v in logs.items() if k.endswith("loss")})
