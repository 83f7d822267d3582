"""SiD: score identity distillation (Zhou et al., 2024) on the Self-Forcing rollout.

Unlike DMD, the noised clip keeps its graph: the loss differentiates through both score networks
with respect to their input (their weights get no update from it; the trainer backpropagates into
the generator's parameters only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.base import MethodConfig, SelfForcingModel


@dataclass
class SiDConfig(MethodConfig):
    sid_alpha: float = 1.0  # weight of the ||real - fake||^2 term (SiD's alpha)


def sid_loss(x, pred_real, pred_fake, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean[(real - fake) . ((real - x) - alpha (real - fake))] / mean|x - real| per sample (SiD eq. 20).

    All of [B, F, C, H, W]; mask [F] bool selects the frames that count. Float64. With the
    predictions held fixed, the gradient with respect to x is -(real - fake) / normalizer / N.
    """
    x64, real, fake = x.double(), pred_real.double(), pred_fake.double()
    with torch.no_grad():
        normalizer = (x64 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    loss = torch.nan_to_num((real - fake) * ((real - x64) - alpha * (real - fake)) / normalizer)
    return loss[:, mask].mean() if mask is not None else loss.mean()


class SiD(SelfForcingModel):
    config_class = SiDConfig
    cfg: SiDConfig

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        video, mask, denoised = self.generate(batch)
        context = self.encode(batch["prompts"])
        b, frames = video.shape[:2]
        t = self.score_timestep(b, frames, denoised)
        noise = self.rng.randn_like(video)
        noisy = self.schedule.add_noise(video, noise, t)  # not detached: SiD differentiates through the scores
        pred_fake = self.guided_x0(self.fake_score, noisy, t, context, self.cfg.fake_guidance_scale)
        pred_real = self.guided_x0(self.real_score, noisy, t, context, self.cfg.guidance_scale)
        loss = sid_loss(video, pred_real, pred_fake, self.cfg.sid_alpha, mask)
        gap = (pred_real.detach() - pred_fake.detach()).abs().mean()
        return loss, {"generator_loss": loss.detach(), "sid_score_gap": gap, "score_timestep": t.mean()}
