"""Decoupled DMD (Liu et al., 2025, "Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching
as the Shield", arXiv 2511.22677) on the Self-Forcing rollout: DMD's rollout and critic, a generator
gradient split into its two parts, each re-noised at its own timestep.

With the real score's CFG (paper eq. 3-4), DMD's gradient is a sum of two different things (eq. 5-6).
In this project's CFG convention, x_cfg = x_c + g (x_c - x_u) (model/base.py guided_x0), the paper's
alpha is 1 + g, and DMD's x0-space gradient (model/dmd.py) splits as

    x_fake,c - x_real,cfg  =  (x_fake,c - x_real,c)  -  (alpha - 1) (x_real,c - x_real,u)
                                 distribution matching       CFG augmentation
                                 (DM, the "shield")          (CA, the "spear")

(x_* the x0 predictions of the noised clip). CA drives the few-step conversion and DM regularises it
(paper Sec. 3.1). Eq. 8 gives each part its own re-noising timestep; the recommended schedule,
"Decoupled-Hybrid" (Tab. 1, setting 4; Algorithm 1 in App. B), draws tau_DM over the whole range
(Sec. 4.2) and tau_CA only at noise levels cleaner than the student's input step t (Sec. 4.1; the
paper's time runs from 0 = noise to 1 = data, so its tau_CA > t is a timestep below t here). Here:

    DM at t_DM: DMD's score timestep (ts_schedule, ts_schedule_max, min_score_timestep; the critic's too)
    CA at t_CA: its own draw and noise, bounded by the rollout's denoised range (ca_ts_schedule_max: below
                the exit step's input timestep; ca_ts_schedule: above its output's)
    grad = dm_weight DM(t_DM) / n_DM + ca_weight CA(t_CA) / n_CA
    loss = 0.5 ||x - sg(x - grad)||^2   (DMD2 eq. 2; Algorithm 1's proxy loss)

with n the per-sample mean |x - x_real,cfg| at the part's own timestep (DMD eq. 8; `normalizer`). The
paper's Algorithm 1 writes no normaliser (normalizer none, the weights its lambda); its SDXL runs keep
DMD2's training setup and change only the schedule (Sec. 4.3), so the default keeps DMD's, per part.
With shared_timestep, weights (1, 1) and normalizer cfg this is DMD exactly (tests/test_decoupled_dmd.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.base import MethodConfig
from model.dmd import DMD

NORMALIZERS = ("cfg", "cond", "none")


@dataclass
class DecoupledDMDConfig(MethodConfig):
    shared_timestep: bool = False  # one re-noise timestep and noise for both parts (DMD's coupled schedule, Tab. 1 setting 1)
    ca_ts_schedule: bool = False  # CA timesteps >= the end of the rollout's denoised range
    ca_ts_schedule_max: bool = True  # CA timesteps < the student's input step: tau_CA > t (Sec. 4.1, Alg. 1)
    dm_weight: float = 1.0  # weight of the distribution-matching part (eq. 8: 1)
    ca_weight: float = 1.0  # weight of the CFG-augmentation part, on top of alpha - 1 = guidance_scale (eq. 8: 1)
    normalizer: str = "cfg"  # per part at its timestep: cfg mean|x - x_real,cfg| (DMD's) | cond mean|x - x_real,c| | none

    def __post_init__(self):
        super().__post_init__()
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        if not self.shared_timestep and (self.ca_ts_schedule or self.ca_ts_schedule_max) and not self.same_step_across_blocks:
            raise ValueError(
                "ca_ts_schedule / ca_ts_schedule_max bound the CA timestep by the rollout's exit step, which needs "
                "same_step_across_blocks=true (one exit step per rollout); set both false for an unbounded CA range"
            )


def normalizer(x64: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor | float:
    """Per-sample mean |x - ref| (DMD eq. 8), [B, 1, 1, 1, 1]; 1 without a reference."""
    if ref is None:
        return 1.0
    return (x64 - ref.double()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)


def decoupled_dmd_loss(x, dm=None, ca=None, *, dm_weight: float = 1.0, ca_weight: float = 1.0,
                       mask: torch.Tensor | None = None):
    """0.5 ||x - sg(x - g)||^2 with g = w_DM DM / n_DM + w_CA CA / n_CA (the paper's eq. 8, x0 space).

    x: [B, F, C, H, W], the generator's clip; mask: [F] bool, frames that count.
    dm: (x_fake, x_real_c, ref) at t_DM, the part DM = x_fake - x_real_c (eq. 6's Delta_real-fake, as a
        descent direction); ca: (x_real_c, x_real_cfg, ref) at t_CA, the part CA = x_real_c - x_real_cfg
        = -(alpha - 1)(x_real_c - x_real_u) (eq. 6's Delta^cfg_real, as a descent direction). ref: the
        prediction each part's normaliser n = mean|x - ref| per sample measures against (None: n = 1).
        A part given as None is 0. With one timestep, refs x_real_cfg and weights 1, g is DMD's
        (x_fake - x_real_cfg) / mean|x - x_real_cfg| (model/dmd.py dmd_loss).
    The gradient with respect to x is g / (number of counted elements). Float64.
    Returns (loss, mean |g|, mean |DM term|, mean |CA term|), the terms weighted and normalised.
    """
    x64 = x.double()
    with torch.no_grad():
        zero = torch.zeros_like(x64)
        dm_grad, ca_grad = zero, zero
        if dm is not None:
            fake, real, ref = dm
            dm_grad = torch.nan_to_num(dm_weight * (fake.double() - real.double()) / normalizer(x64, ref))  # eq. 8, DM
        if ca is not None:
            cond, guided, ref = ca
            ca_grad = torch.nan_to_num(ca_weight * (cond.double() - guided.double()) / normalizer(x64, ref))  # eq. 8, CA
        grad = dm_grad + ca_grad  # eq. 8: Delta_DM + Delta_CA
        target = x64 - grad
    if mask is not None:
        x64, target = x64[:, mask], target[:, mask]
    loss = 0.5 * F.mse_loss(x64, target)  # DMD2 eq. 2; Algorithm 1's proxy loss
    return loss, grad.abs().mean(), dm_grad.abs().mean(), ca_grad.abs().mean()


class DecoupledDMD(DMD):
    """DMD with its DM and CA parts at their own timesteps, weights and normalisers (see the module doc)."""

    config_class = DecoupledDMDConfig
    cfg: DecoupledDMDConfig

    def ca_timestep(self, batch: int, frames: int, denoised: tuple[int, int] | None) -> torch.Tensor:
        """[B, F]: score_timestep's draw with the CA bounds: below the exit step's input timestep by default."""
        return self.score_timestep(batch, frames, denoised, above=self.cfg.ca_ts_schedule, below=self.cfg.ca_ts_schedule_max)

    def real_predictions(self, noisy, t, context, uncond: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (x_c, x_cfg), x_cfg as guided_x0 computes it; without `uncond`, x_cfg is x_c."""
        cond = self.x0(self.real_score, noisy, t, context)
        if not uncond:
            return cond, cond
        return cond, cond + self.cfg.guidance_scale * (cond - self.x0(self.real_score, noisy, t, self.negative(noisy.shape[0])))

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        video, mask, denoised = self.generate(batch)
        context = self.encode(batch["prompts"])
        b, frames = video.shape[:2]
        use_dm = cfg.dm_weight != 0
        use_ca = cfg.ca_weight != 0 and cfg.guidance_scale != 0  # alpha = 1: no CFG augmentation
        # the draws: DM's as DMD's (timestep, then noise), then CA's own unless shared
        t_dm = self.score_timestep(b, frames, denoised)
        noise_dm = self.rng.randn_like(video)
        if not cfg.shared_timestep:
            t_ca = self.ca_timestep(b, frames, denoised)
            noise_ca = self.rng.randn_like(video)
        with torch.no_grad():
            noisy_dm = self.schedule.add_noise(video.detach(), noise_dm, t_dm)
            dm = ca = None
            if cfg.shared_timestep:
                t_ca = t_dm
                uncond = cfg.guidance_scale != 0 and (use_ca or cfg.normalizer == "cfg")
                real_c, real_cfg = self.real_predictions(noisy_dm, t_dm, context, uncond)
                if use_dm:
                    fake = self.guided_x0(self.fake_score, noisy_dm, t_dm, context, cfg.fake_guidance_scale)
                    dm = (fake, real_c, self.reference(real_c, real_cfg))
                if use_ca:
                    ca = (real_c, real_cfg, self.reference(real_c, real_cfg))
            else:
                if use_dm:
                    uncond = cfg.guidance_scale != 0 and cfg.normalizer == "cfg"  # an unconditional call for n_DM only
                    fake = self.guided_x0(self.fake_score, noisy_dm, t_dm, context, cfg.fake_guidance_scale)
                    real_c, real_cfg = self.real_predictions(noisy_dm, t_dm, context, uncond)
                    dm = (fake, real_c, self.reference(real_c, real_cfg))
                if use_ca:
                    noisy_ca = self.schedule.add_noise(video.detach(), noise_ca, t_ca)
                    real_c, real_cfg = self.real_predictions(noisy_ca, t_ca, context, True)
                    ca = (real_c, real_cfg, self.reference(real_c, real_cfg))
        loss, grad_norm, dm_norm, ca_norm = decoupled_dmd_loss(
            video, dm, ca, dm_weight=cfg.dm_weight, ca_weight=cfg.ca_weight, mask=mask
        )
        return loss, {"generator_loss": loss.detach(), "dmd_grad_norm": grad_norm, "dm_grad_norm": dm_norm,
                      "ca_grad_norm": ca_norm, "score_timestep": t_dm.mean(), "ca_timestep": t_ca.mean()}

    def reference(self, real_c: torch.Tensor, real_cfg: torch.Tensor) -> torch.Tensor | None:
        """What a part's normaliser measures x against, at that part's timestep (`normalizer`)."""
        return {"cfg": real_cfg, "cond": real_c, "none": None}[self.cfg.normalizer]
