"""DMD: distribution matching distillation (Yin et al., 2024), as Self Forcing uses it.

The generator's clip x is noised to a random timestep; the real score (teacher, with CFG) and the
fake score (critic) denoise it; their difference is the KL gradient, which the loss feeds back to x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.base import MethodConfig, SelfForcingModel


def dmd_loss(x, pred_real, pred_fake, mask: torch.Tensor | None = None):
    """0.5 ||x - sg(x - g)||^2 with g = (fake - real) / mean|x - real| per sample (DMD eq. 7 / DMD2 eq. 2).

    x, pred_real, pred_fake: [B, F, C, H, W] (x0 predictions); mask: [F] bool, frames that count.
    The gradient of the loss with respect to x is g / (number of counted elements). Float64.
    Returns (loss, mean |g|).
    """
    with torch.no_grad():
        x64, real = x.double(), pred_real.double()
        normalizer = (x64 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((pred_fake.double() - real) / normalizer)
        target = x64 - grad
    x64 = x.double()
    if mask is not None:
        x64, target = x64[:, mask], target[:, mask]
    return 0.5 * F.mse_loss(x64, target), grad.abs().mean()


class DMD(SelfForcingModel):
    config_class = MethodConfig

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        video, mask, denoised = self.generate(batch)
        context = self.encode(batch["prompts"])
        b, frames = video.shape[:2]
        t = self.score_timestep(b, frames, denoised)
        with torch.no_grad():
            noise = self.rng.randn_like(video)
            noisy = self.schedule.add_noise(video.detach(), noise, t)
            pred_fake = self.guided_x0(self.fake_score, noisy, t, context, self.cfg.fake_guidance_scale)
            pred_real = self.guided_x0(self.real_score, noisy, t, context, self.cfg.guidance_scale)
        loss, grad_norm = dmd_loss(video, pred_real, pred_fake, mask)
        return loss, {"generator_loss": loss.detach(), "dmd_grad_norm": grad_norm, "score_timestep": t.mean()}
