"""ODE regression: the causal student learns the teacher's ODE map from noisy states to clean clips.

Self Forcing initialises its generator this way (CausVid's ODE initialisation): the teacher's
deterministic sampler gives, for one noise draw, the states at the student's timesteps and the
final clip; every block of the student gets the state at its own random step and must predict
the final clip, through the whole-clip block-causal forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.base import MethodConfig, SelfForcingModel
from model.contract import Phase
from pipeline.ode import euler_sample, sigma_grid


class ODERegression(SelfForcingModel):
    config_class = MethodConfig
    # no critic: the generator alone, every step, on the teacher's recorded pairs or, for a teacher
    # cheap enough to sample on the fly (the toy world's), on prompts
    networks = {k: v for k, v in SelfForcingModel.networks.items() if k != "critic"}
    phases = (Phase("generator", "generator_loss", ("generator",), data=("ode_pairs|prompts",)),)

    def teacher_trajectory(self, prompts: list[str], num_frames: int) -> torch.Tensor:
        """[B, S + 1, F, C, H, W]: the teacher's states at the S student steps, then its final clip."""
        cfg = self.cfg
        sigmas = [t / self.schedule.num_train_timesteps for t in self.steps]
        grid = sigma_grid(cfg.ode_steps, cfg.timestep_shift, include=sigmas)
        context = self.encode(prompts)
        noise = self.rng.randn((len(prompts), num_frames, *self.latent_shape))
        uncond = self.negative(len(prompts)) if cfg.ode_guidance_scale != 1.0 else None
        final, states = euler_sample(self.real_score, noise, grid, context, uncond, cfg.ode_guidance_scale, record=sigmas)
        return torch.stack([*states, final], dim=1)

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        frames = self.cfg.num_training_frames
        ode = batch["ode"].to(self.device) if "ode" in batch else self.teacher_trajectory(batch["prompts"], frames)
        b = ode.shape[0]
        index = self.block_step_index(b, ode.shape[2])  # [B, F]: a step per sample and block
        noisy = torch.gather(ode[:, :-1], 1, index[:, None, :, None, None, None].expand(-1, 1, -1, *ode.shape[3:]))[:, 0]
        t = torch.tensor(self.steps, device=self.device)[index]
        context = self.encode(batch["prompts"])
        pred = self.schedule.x0_from_flow(noisy, self.generator(noisy, t, context, causal=self.pattern), t)
        loss = F.mse_loss(pred.float(), ode[:, -1].float())
        return loss, {"generator_loss": loss.detach()}
