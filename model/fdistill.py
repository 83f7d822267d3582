"""f-distill: distribution matching with an f-divergence (Xu et al., 2025, "One-step Diffusion Models
with f-Divergence Distribution Matching", arXiv 2502.15681), on the Self-Forcing rollout.

DMD minimises the reverse KL between the student's and the teacher's distributions; its gradient at a
noised sample x_t is the score difference (fake - real). For an f-divergence D_f(p || q) the gradient
is the same score difference weighted per sample by h(r) = f''(r) r^2, with r = p(x_t) / q(x_t) the
density ratio of the teacher's (p) to the student's (q) noised distributions (f-distill's gradient theorem).
A discriminator trained with the logistic loss has D*(x_t) = log r (real labelled 1), so r = exp(D)
with D the GAN head of DMD2 (model/dmd2.py), trained on real clips in the critic's phase:

    reverse_kl  h = 1           (plain DMD: mode-seeking)
    kl          h = r           (forward KL: mass-covering)
    js          h = r / (1 + r) (Jensen-Shannon)
    hellinger   h = sqrt(r)     (squared Hellinger; constants drop out in the normalisation)
    jeffreys    h = 1 + r       (KL + reverse KL)
    neyman      h = 1 / r       (Neyman chi^2)

log r is clipped to [-log_ratio_clip, log_ratio_clip], and the weights are divided by their mean over
the global batch (every rank and micro-batch of the update), as f-distill normalises them for a stable
scale. With several micro-batches the mean comes from a prepass (model/contract.py Phase).
The GAN generator term of DMD2 stays available (gan.generator_weight), as f-distill trains with it;
reverse_kl with gan.generator_weight=0 is plain DMD exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from model.dmd2 import DMD2, DMD2Config
from utils.distributed import all_reduce_mean

DIVERGENCES = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "hellinger": lambda r: r.sqrt(),
    "jeffreys": lambda r: 1 + r,
    "neyman": lambda r: 1 / r,
}


@dataclass
class FDivConfig:
    divergence: str = "js"  # one of reverse_kl, kl, js, hellinger, jeffreys, neyman
    log_ratio_clip: float | None = 5.0  # clip log r = D to [-c, c] (null: no clip)
    normalize: bool = True  # divide the weights by their mean over the global batch

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"method.fdiv.divergence={self.divergence!r}: expected one of {list(DIVERGENCES)}")
        if self.log_ratio_clip is not None and self.log_ratio_clip <= 0:
            raise ValueError(f"method.fdiv.log_ratio_clip must be > 0 or null, got {self.log_ratio_clip}")


@dataclass
class FDistillConfig(DMD2Config):
    fdiv: FDivConfig = field(default_factory=FDivConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fdiv, dict):
            self.fdiv = FDivConfig(**self.fdiv)


def fdiv_weights(log_ratio: torch.Tensor, divergence: str, clip: float | None) -> torch.Tensor:
    """h(r) per sample, r = exp(clip(log_ratio)); float64 (the formula table of the module doc)."""
    log_ratio = log_ratio.double()
    if clip is not None:
        log_ratio = log_ratio.clamp(-clip, clip)
    return DIVERGENCES[divergence](log_ratio.exp())


class FDistill(DMD2):
    config_class = FDistillConfig
    cfg: FDistillConfig
    phases = (replace(DMD2.phases[0], prepass="weight_totals"), *DMD2.phases[1:])

    @property
    def weighted(self) -> bool:
        return self.cfg.fdiv.divergence != "reverse_kl"

    def ratio_weights(self, noisy, t, context) -> tuple[torch.Tensor, torch.Tensor]:
        """(h(r) [B], D [B]) at the noised generator clips, the discriminator's features held constant."""
        with torch.no_grad():
            logit = self.discriminate(noisy, t, context, through_critic=False)
        fd = self.cfg.fdiv
        return fdiv_weights(logit, fd.divergence, fd.log_ratio_clip), logit

    def sample_weights(self, noisy, t, context, batch: dict) -> tuple[torch.Tensor | None, dict]:
        if not self.weighted:
            return None, {}
        h, logit = self.ratio_weights(noisy, t, context)
        logs = {"fdiv_log_ratio": logit.mean().detach()}
        if self.cfg.fdiv.normalize:
            totals = batch.get("totals")
            if totals:  # the prepass summed every micro-batch of every rank
                mean = totals["weight_sum"] / totals["count"]
            else:  # one micro-batch: the ranks' sums
                sums = all_reduce_mean(torch.stack([h.sum(), torch.tensor(float(h.numel()), dtype=h.dtype, device=h.device)]))
                mean = sums[0] / sums[1]
            h = h / mean
        logs["fdiv_weight_max"] = h.max()
        return h, logs

    def weight_totals(self, batch: dict) -> dict:
        """The prepass: the sum and count of h(r) over this micro-batch, drawn exactly as the loss draws
        them (rollout, score timestep, noise: distribution_matching's order)."""
        if not (self.weighted and self.cfg.fdiv.normalize):
            return {}
        video, _, denoised = self.generate(batch)
        b, frames = video.shape[:2]
        t = self.score_timestep(b, frames, denoised)
        noisy = self.schedule.add_noise(video, self.rng.randn_like(video), t)
        h, _ = self.ratio_weights(noisy, t, self.encode(batch["prompts"]))
        return {"weight_sum": h.sum(), "count": torch.tensor(float(b), dtype=h.dtype, device=h.device)}
