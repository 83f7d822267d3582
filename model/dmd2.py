"""DMD2: distribution matching with a GAN term (Yin et al., 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", arXiv 2405.14867), on the Self-Forcing rollout.

Next to DMD's gradient (model/dmd.py), a discriminator D tells real clips from the generator's, both
noised to the same timestep t. D is a small head (model/wan/discriminator.py) on the fake score's
hidden states of chosen blocks: DMD2 Sec. 4.3 puts it on the fake score's bottleneck, so the critic's
features serve both jobs. Non-saturating losses (DMD2 Sec. 4.3; Goodfellow et al., 2014):

    generator:      w_G E[softplus(-D(x_t^fake, t))]
    discriminator:  w_D (E[softplus(D(x_t^fake, t))] + E[softplus(-D(x_t^real, t))])
                    + w_R1 E[((D(x_t^real + s eps) - D(x_t^real)) / s)^2]   (approximate R1, a finite
                    difference along a random direction, as the Self-Forcing reference's GAN does)

The discriminator trains in the critic's phase, on the critic phase's rollout, with real clips from
the data set (clean latents, the clean ends of ODE pairs, or the toy world's templates). By default
only the head learns from the discriminator loss: the critic stays a denoiser of the generator's
samples, which DMD's gradient needs (`gan.train_critic=true`: the critic's features learn from it
too, as DMD2's shared fake U-Net does). The generator term's gradient reaches the generator through
the critic's features (the critic gets no update in the generator's phase).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.base import MethodConfig, SelfForcingModel
from model.contract import Network, Phase
from model.dmd import DMD
from model.wan.discriminator import DESIGNS, DiscriminatorHead, default_blocks


@dataclass
class GANConfig:
    generator_weight: float = 5e-3  # w_G (DMD2's SDXL setting gen_cls_loss_weight)
    discriminator_weight: float = 1e-2  # w_D (DMD2's guidance_cls_loss_weight)
    blocks: list[int] | None = None  # critic blocks the head reads (null: three from the middle to the last; Wan-1.3B: [13, 21, 29])
    head: str = "registers"  # registers: a learned token per block cross-attends to its tokens; pool: mean over tokens
    width: int | None = None  # the classifier MLP's hidden width (null: the critic's width)
    heads: int | None = None  # attention heads of the register summaries (null: the critic's)
    r1_weight: float = 0.0  # w_R1, approximate R1 on real clips (0: off)
    r1_sigma: float = 0.01  # s, the finite difference's step
    train_critic: bool = False  # the discriminator loss also trains the critic's features (DMD2's sharing)

    def __post_init__(self):
        if self.head not in DESIGNS:
            raise ValueError(f"method.gan.head={self.head!r}: expected one of {DESIGNS}")
        for key in ("generator_weight", "discriminator_weight", "r1_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.gan.{key} must be >= 0, got {getattr(self, key)}")
        if self.r1_sigma <= 0:
            raise ValueError(f"method.gan.r1_sigma must be > 0, got {self.r1_sigma}")


@dataclass
class DMD2Config(MethodConfig):
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.gan, dict):
            self.gan = GANConfig(**self.gan)


def critic_blocks(gan: GANConfig, depth: int) -> list[int]:
    """The critic blocks the head reads; an index past the critic's depth names the key."""
    blocks = default_blocks(depth) if gan.blocks is None else list(gan.blocks)
    bad = [i for i in blocks if not 0 <= i < depth]
    if not blocks or bad:
        raise ValueError(f"method.gan.blocks={blocks}: the critic has {depth} blocks, so indices must be in 0..{depth - 1}")
    return blocks


def build_discriminator(cfg, built: dict) -> DiscriminatorHead:
    """The head on the critic's features, sized from the critic (the method declares it after the critic)."""
    gan, config = GANConfig(**OmegaConf.to_container(cfg.method.gan, resolve=True)), built["critic"].config
    blocks = critic_blocks(gan, config.num_layers)
    dim = config.num_attention_heads * config.attention_head_dim
    return DiscriminatorHead(dim, len(blocks), gan.head, gan.width, gan.heads or config.num_attention_heads, config.eps)


def gan_generator_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss, mean softplus(-D(fake)) (DMD2 Sec. 4.3)."""
    return F.softplus(-fake_logit).mean()


def gan_discriminator_loss(fake_logit: torch.Tensor, real_logit: torch.Tensor) -> torch.Tensor:
    """mean softplus(D(fake)) + mean softplus(-D(real)): logistic loss, real labelled 1 (DMD2 Sec. 4.3)."""
    return F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()


def r1_penalty(perturbed_logit: torch.Tensor, real_logit: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[((D(x + s eps) - D(x)) / s)^2]: a finite-difference estimate of E||grad D||^2 along eps."""
    return ((perturbed_logit - real_logit) / sigma).square().mean()


class DMD2(DMD):
    config_class = DMD2Config
    cfg: DMD2Config
    networks = {**SelfForcingModel.networks,
                "discriminator": Network("discriminator", build=build_discriminator, trained=True, blocks=())}
    # The generator rolls out from prompts (or the data set's captions); the critic phase also draws real clips.
    phases = (
        Phase("generator", "generator_loss", ("generator",), every="dfake_gen_update_ratio",
              data=("prompts|videos|ode_pairs",)),
        Phase("critic", "critic_loss", ("critic", "discriminator"), data=("prompts|videos|ode_pairs", "videos|ode_pairs")),
    )

    @property
    def feature_blocks(self) -> list[int]:
        return critic_blocks(self.cfg.gan, len(self.fake_score.blocks))

    def discriminate(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     through_critic: bool = True) -> torch.Tensor:
        """D(x_t, t): realism logits [B] from the critic's hidden states of a noised clip.
        through_critic=False: the features are constants (no graph through the critic)."""
        with contextlib.nullcontext() if through_critic else torch.no_grad():
            features = self.fake_score(noisy, t, context, features=self.feature_blocks)
        return self.discriminator(features)

    def real_clips(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """Clean latents of the batch's real clips [B, F, C, H, W] and their captions."""
        clips = self.batch_latents(batch)
        prompts = batch.get("videos_prompts") or batch.get("ode_pairs_prompts") or batch["prompts"]
        if clips.shape[1] != self.cfg.num_training_frames:
            raise ValueError(f"real clips have {clips.shape[1]} latent frames, expected num_training_frames="
                             f"{self.cfg.num_training_frames} (the generator's clips the discriminator compares them with)")
        return clips, prompts

    # ---------------------------------------------------------------- losses
    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        video, mask, denoised = self.generate(batch)
        context = self.encode(batch["prompts"])
        loss, logs = self.distribution_matching(video, mask, denoised, context, batch)
        gan = self.cfg.gan
        if gan.generator_weight > 0:
            t = self.score_timestep(video.shape[0], video.shape[1], denoised)
            noisy = self.schedule.add_noise(video, self.rng.randn_like(video), t)  # keeps its graph to the generator
            g_loss = gan_generator_loss(self.discriminate(noisy, t, context))
            loss = loss + gan.generator_weight * g_loss.double()
            logs["gan_generator_loss"] = g_loss.detach()
        return loss, {"generator_loss": loss.detach(), **logs}

    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The critic's denoising loss on the rollout, plus the discriminator's loss on the same clips."""
        with torch.no_grad():
            video, _, denoised = self.generate(batch)
        denoising, logs = self.denoising_loss(video, self.encode(batch["prompts"]), denoised)
        d_loss, d_logs = self.discriminator_loss(video, batch, denoised)
        loss = denoising + d_loss
        return loss, {**logs, **d_logs, "critic_denoising_loss": denoising.detach(), "critic_loss": loss.detach()}

    def discriminator_loss(self, fake: torch.Tensor, batch: dict, denoised) -> tuple[torch.Tensor, dict]:
        gan = self.cfg.gan
        real, real_prompts = self.real_clips(batch)
        b, frames = fake.shape[:2]
        t = self.score_timestep(b, frames, denoised)
        noise = self.rng.randn_like(fake)  # fake and real noised alike: same t, same noise
        t2 = torch.cat([t, t])
        noisy = self.schedule.add_noise(torch.cat([fake, real.to(fake.dtype)]), torch.cat([noise, noise]), t2)
        context = torch.cat([self.encode(batch["prompts"]), self.encode(real_prompts)])
        # only the head learns from it, unless gan.train_critic
        fake_logit, real_logit = self.discriminate(noisy, t2, context, gan.train_critic).chunk(2)
        d_loss = gan_discriminator_loss(fake_logit, real_logit)
        loss = gan.discriminator_weight * d_loss
        logs = {"gan_discriminator_loss": d_loss.detach(), "d_real_logit": real_logit.detach().mean(),
                "d_fake_logit": fake_logit.detach().mean()}
        if gan.r1_weight > 0:
            perturbed = self.discriminate(noisy[b:] + gan.r1_sigma * self.rng.randn_like(real), t, context[b:],
                                          gan.train_critic)
            r1 = r1_penalty(perturbed, real_logit, gan.r1_sigma)
            loss = loss + gan.r1_weight * r1
            logs["r1_penalty"] = r1.detach()
        return loss, logs
