"""DMD: distribution matching distillation (Yin et al., 2024), as Self Forcing uses it.

The generator's clip x is noised to a random timestep; the real score (teacher, with CFG) and the
fake score (critic) denoise it; their difference is the KL gradient, which the loss feeds back to x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.base import MethodConfig, SelfForcingModel


def dmd_loss(x, pred_real, pred_fake, mask: torch.Tensor | None = None, weight: torch.Tensor | None = None):
    """0.5 ||x - sg(x - g)||^2 with g = (fake - real) / mean|x - real| per sample (DMD eq. 7 / DMD2 eq. 2).

    x, pred_real, pred_fake: [B, F, C, H, W] (x0 predictions); mask: [F] bool, frames that count;
    weight: [B], a factor on each sample's g (f-distill's h(r), model/fdistill.py; None: 1).
    The gradient of the loss with respect to x is weight g / (number of counted elements). Float64.
    Returns (loss, mean |g|).
    """
    with torch.no_grad():
        x64, real = x.double(), pred_real.double()
        normalizer = (x64 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((pred_fake.double() - real) / normalizer)
        if weight is not None:
            grad = grad * weight.double().view(-1, 1, 1, 1, 1)
        target = x64 - grad
    x64 = x.double()
    if mask is not None:
        x64, target = x64[:, mask], target[:, mask]
    return 0.5 * F.mse_loss(x64, target), grad.abs().mean()


class DMD(SelfForcingModel):
    config_class = MethodConfig

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        video, mask, denoised = self.generate(batch)
        loss, logs = self.distribution_matching(video, mask, denoised, self.encode(batch["prompts"]), batch)
        return loss, {"generator_loss": loss.detach(), **logs}

    def distribution_matching(self, video, mask, denoised, context, batch: dict) -> tuple[torch.Tensor, dict]:
        """The DMD loss of the generator's clip: noised to a score timestep, denoised by both scores."""
        with torch.no_grad():
            t, noisy = self.noised_for_scores(video.detach(), denoised)
            pred_fake = self.guided_x0(self.fake_score, noisy, t, context, self.cfg.fake_guidance_scale)
            pred_real = self.guided_x0(self.real_score, noisy, t, context, self.cfg.guidance_scale)
            weight, logs = self.sample_weights(noisy, t, context, batch)
        loss, grad_norm = dmd_loss(video, pred_real, pred_fake, mask, weight)
        return loss, {"dmd_grad_norm": grad_norm, "score_timestep": t.mean(), **logs}

    def noised_for_scores(self, video, denoised) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B, F], x_t): the clip noised to a score timestep; the draws in this order (t, then noise)."""
        t = self.score_timestep(video.shape[0], video.shape[1], denoised)
        return t, self.schedule.add_noise(video, self.rng.randn_like(video), t)

    def sample_weights(self, noisy, t, context, batch: dict) -> tuple[torch.Tensor | None, dict]:
        """Per-sample factors on the DMD gradient ([B] or None: all 1), and what to log about them."""
        return None, {}
