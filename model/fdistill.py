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

log r is clipped to [-log_ratio_clip, log_ratio_clip]. Optionally (`ratio_bins` > 0) r is divided by
its running mean on the student's samples in its timestep bin: the true ratio has E_q[r] = 1 at every
noise level, so this calibrates a discriminator whose scale drifts with t. The running means (an EMA
over steps of each bin's mean over the global batch, updated between steps, so every micro-batch of
a step and its prepass see the same ones) are run state, checkpointed (`ratio_stats`). Then the
weights are divided by their mean over the global batch (every rank and micro-batch of the update),
as f-distill normalises them for a stable scale. With several micro-batches the mean comes from a prepass (model/contract.py Phase).
The GAN generator term of DMD2 stays available (gan.generator_weight), as f-distill trains with it;
reverse_kl with gan.generator_weight=0 is plain DMD exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from model.contract import Network
from model.dmd2 import DMD2, DMD2Config
from utils.distributed import all_reduce_mean, get_world_size

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
    ratio_bins: int = 0  # > 0: divide r by its running mean on the student's samples in this many timestep bins
    ratio_momentum: float = 0.99  # EMA decay of those running means, per step

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"method.fdiv.divergence={self.divergence!r}: expected one of {list(DIVERGENCES)}")
        if self.log_ratio_clip is not None and self.log_ratio_clip <= 0:
            raise ValueError(f"method.fdiv.log_ratio_clip must be > 0 or null, got {self.log_ratio_clip}")
        if self.ratio_bins < 0 or not 0 <= self.ratio_momentum < 1:
            raise ValueError(f"method.fdiv.ratio_bins must be >= 0 and ratio_momentum in [0, 1), got "
                             f"{self.ratio_bins}, {self.ratio_momentum}")


@dataclass
class FDistillConfig(DMD2Config):
    fdiv: FDivConfig = field(default_factory=FDivConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fdiv, dict):
            self.fdiv = FDivConfig(**self.fdiv)


def density_ratio(log_ratio: torch.Tensor, clip: float | None) -> torch.Tensor:
    """r = exp(clip(log_ratio)), float64."""
    log_ratio = log_ratio.double()
    return (log_ratio if clip is None else log_ratio.clamp(-clip, clip)).exp()


def fdiv_weights(log_ratio: torch.Tensor, divergence: str, clip: float | None) -> torch.Tensor:
    """h(r) per sample, r = exp(clip(log_ratio)); float64 (the formula table of the module doc)."""
    return DIVERGENCES[divergence](density_ratio(log_ratio, clip))


class RatioStats(nn.Module):
    """Running means of r per timestep bin (buffers: checkpointed run state, the same on every rank).

    A step's sums (over the global batch) are added to `pending` while it runs and folded into `mean`
    when the next step begins, so all micro-batches of a step, and its prepass, divide by the same means.
    """

    def __init__(self, bins: int, momentum: float, timesteps: int = 1000):
        super().__init__()
        self.bins, self.momentum, self.timesteps = bins, momentum, timesteps
        self.register_buffer("mean", torch.ones(max(bins, 1), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(max(bins, 1), dtype=torch.bool))
        self.register_buffer("pending", torch.zeros(2, max(bins, 1), dtype=torch.float64))  # sums of r, counts
        self.register_buffer("step", torch.tensor(-1))

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        """[B] bin indices of per-sample timesteps t [B] in [0, timesteps]."""
        return (t.double() / self.timesteps * self.bins).long().clamp(0, self.bins - 1)

    @torch.no_grad()
    def begin_step(self, step: int) -> None:
        if int(self.step) == step:
            return
        sums, counts = self.pending
        batch_mean = sums / counts.clamp(min=1)
        got = counts > 0
        blended = torch.where(self.seen, self.momentum * self.mean + (1 - self.momentum) * batch_mean, batch_mean)
        self.mean.copy_(torch.where(got, blended, self.mean))
        self.seen |= got
        self.pending.zero_()
        self.step.fill_(step)

    @torch.no_grad()
    def add(self, r: torch.Tensor, bins: torch.Tensor) -> None:
        """Add a micro-batch's r (this rank's samples) to the step's sums, over all ranks."""
        local = torch.zeros_like(self.pending)
        local[0].index_add_(0, bins, r.to(local))
        local[1].index_add_(0, bins, torch.ones_like(r, dtype=local.dtype))
        self.pending += all_reduce_mean(local) * get_world_size()


def build_ratio_stats(cfg, built: dict) -> RatioStats:
    fdiv = cfg.method.fdiv
    return RatioStats(fdiv.ratio_bins, fdiv.ratio_momentum)


class FDistill(DMD2):
    config_class = FDistillConfig
    cfg: FDistillConfig
    networks = {**DMD2.networks, "ratio_stats": Network("ratio_stats", build=build_ratio_stats, shard=False, state=True)}
    phases = (replace(DMD2.phases[0], prepass="weight_totals"), *DMD2.phases[1:])

    @property
    def weighted(self) -> bool:
        return self.cfg.fdiv.divergence != "reverse_kl"

    def reseed(self, seed: int, step: int, phase: str, sample_ids: list[int]) -> None:
        super().reseed(seed, step, phase, sample_ids)
        if phase == "generator" and self.cfg.fdiv.ratio_bins > 0:
            self.ratio_stats.begin_step(step)  # fold in the previous generator step's sums

    def ratio_weights(self, noisy, t, context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h(r) [B], D [B], r before the running normalisation [B]) at the noised generator clips, the
        discriminator's features held constant."""
        with torch.no_grad():
            logit = self.discriminate(noisy, t, context, through_critic=False)
        fd = self.cfg.fdiv
        r = density_ratio(logit, fd.log_ratio_clip)
        calibrated = r / self.ratio_stats.mean[self.ratio_stats.bin_of(t[:, 0])] if fd.ratio_bins > 0 else r
        return DIVERGENCES[fd.divergence](calibrated), logit, r

    def sample_weights(self, noisy, t, context, batch: dict) -> tuple[torch.Tensor | None, dict]:
        if not self.weighted:
            return None, {}
        h, logit, r = self.ratio_weights(noisy, t, context)
        if self.cfg.fdiv.ratio_bins > 0:
            self.ratio_stats.add(r, self.ratio_stats.bin_of(t[:, 0]))
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
        them (the rollout, then noised_for_scores, as distribution_matching)."""
        if not (self.weighted and self.cfg.fdiv.normalize):
            return {}
        video, _, denoised = self.generate(batch)
        t, noisy = self.noised_for_scores(video, denoised)
        h = self.ratio_weights(noisy, t, self.encode(batch["prompts"]))[0]
        return {"weight_sum": h.sum(), "count": torch.tensor(float(h.numel()), dtype=h.dtype, device=h.device)}
