"""SelfForcingModel: the networks of a distillation run, the noise schedule, and the generator rollout.

A method (DMD, SiD, CausVid) receives its networks already built: the generator (block-causal
student), the real score (frozen teacher), the fake score (critic), the text encoder and the VAE.
Every network is called the Wan way, `net(x [B, F, C, H, W], timestep [B, F], context) -> flow`.
What a method trains, and how, it declares (model/contract.py): `networks` and `phases`; the
default is Self Forcing's, a generator phase every `dfake_gen_update_ratio` steps and a critic
phase every step. Each phase's loss returns `(loss, logs)`; a batch is a dict with `prompts`
(list of str) and, for data-based methods, `latents` / `video` / `ode`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from model.contract import Network, Phase, check_contract
from model.schedule import RENOISE, FlowSchedule
from model.wan.attention import CausalPattern
from model.wan.transformer import WanDiT
from pipeline.rollout import chunk_starts, draw_exit_steps, rollout
from utils.distributed import broadcast_object
from utils.sample_rng import SampleRNG, mix_seed


@dataclass
class MethodConfig:
    """Knobs shared by the methods; names follow the Self-Forcing reference configs."""

    denoising_step_list: list[float] = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_denoising_step: bool = True  # warp the step list onto the shifted schedule
    timestep_shift: float = 5.0  # Wan's sigma shift
    # the shift of the score timesteps (the DMD / SiD loss, the critic's) alone; null: timestep_shift. The
    # Self-Forcing reference keeps one; SimpleTuner's DMD (distillation_config.timestep_shift: 1) splits them
    score_timestep_shift: float | None = None
    num_frame_per_block: int = 3  # frames per chunk of the block-causal generator
    independent_first_frame: bool = False  # frame 0 is a block of its own
    local_attn_size: int = -1  # generator attention window in frames (-1: all earlier blocks)
    sink_size: int = 0  # frames at the start that stay visible with a window
    context_noise: float = 0.0  # timestep at which each finished chunk is written into the KV cache
    same_step_across_blocks: bool = True  # one exit step for all chunks of a rollout
    last_step_only: bool = False  # always exit at the last denoising step
    num_training_frames: int = 21  # latent frames the losses see; only they get gradients
    min_num_frames: int | None = None  # rollout length range in frames (None: num_training_frames)
    max_num_frames: int | None = None
    guidance_scale: float = 3.0  # real score CFG: cond + g (cond - uncond)
    fake_guidance_scale: float = 0.0  # optional CFG on the fake score
    ts_schedule: bool = False  # score timesteps no lower than the rollout's denoised range
    ts_schedule_max: bool = False  # score timesteps no higher than the rollout's denoised range
    min_score_timestep: int = 0
    min_step_ratio: float = 0.02  # score timesteps clamped to [ratio * 1000, ...]
    max_step_ratio: float = 0.98
    negative_prompt: str = ""  # the unconditional branch of CFG
    ode_steps: int = 48  # Euler steps of the teacher's ODE trajectories (ODE regression / warm start)
    ode_guidance_scale: float = 1.0  # CFG of that ODE, Wan's convention: uncond + g (cond - uncond)
    # between steps the x0 prediction is re-noised with fresh noise (Self Forcing's sampler) or, "implied", with the
    # noise it implies: deterministic Euler / DDIM steps, for students trained to jump along the ODE (DCM)
    renoise: str = "fresh"

    def __post_init__(self):
        if self.min_num_frames is None:
            self.min_num_frames = self.num_training_frames
        if self.max_num_frames is None:
            self.max_num_frames = self.min_num_frames
        if not self.num_training_frames <= self.min_num_frames <= self.max_num_frames:
            raise ValueError(
                f"need num_training_frames <= min_num_frames <= max_num_frames, got {self.num_training_frames}, "
                f"{self.min_num_frames}, {self.max_num_frames}"
            )
        if self.renoise not in RENOISE:
            raise ValueError(f"method.renoise={self.renoise!r}: expected one of {RENOISE}")
        if not 0 <= self.min_step_ratio < self.max_step_ratio <= 1:
            raise ValueError(f"need 0 <= min_step_ratio < max_step_ratio <= 1, got {self.min_step_ratio}, {self.max_step_ratio}")

    @property
    def pattern(self) -> CausalPattern:
        return CausalPattern(self.num_frame_per_block, self.independent_first_frame, self.local_attn_size, self.sink_size)


class RolloutParts:
    """What the block-causal rollout needs besides the generator, shared by training and inference
    (engine/student.py): the schedule, the warped step list, the block pattern, text encoding."""

    cfg: MethodConfig
    generator: torch.nn.Module
    text_encoder: torch.nn.Module

    def init_rollout(self, cfg: MethodConfig, latent_shape) -> None:
        self.cfg = cfg
        self.latent_shape = tuple(latent_shape)  # (C, H, W) of one latent frame
        self.schedule = FlowSchedule(cfg.timestep_shift, renoise=cfg.renoise)
        self.steps = self.schedule.denoising_steps(cfg.denoising_step_list, cfg.warp_denoising_step)
        self.pattern = cfg.pattern

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings on the generator's device, in its parameters' dtype."""
        param = next(self.generator.parameters())
        return self.text_encoder(prompts)["prompt_embeds"].to(device=param.device, dtype=param.dtype)

    def pattern_for(self, num_frames: int) -> CausalPattern:
        """The generator's pattern for a clip: past the training length, a rolling window of that length."""
        pattern = self.pattern
        if num_frames <= self.cfg.num_training_frames or pattern.windowed:
            return pattern
        return replace(pattern, local_attn_size=self.cfg.num_training_frames)


class SelfForcingModel(torch.nn.Module, RolloutParts):
    # The contract (model/contract.py), in build order: the frozen parts, then the trained networks.
    networks = {
        "text_encoder": Network("text_encoder", build="text_encoder"),
        "vae": Network("vae", build="vae", shard=False),
        "teacher": Network("real_score", build="teacher"),
        "generator": Network("generator", build="generator", trained=True, ema=True),
        "critic": Network("fake_score", build="critic", trained=True),
    }
    phases = (
        Phase("generator", "generator_loss", ("generator",), every="dfake_gen_update_ratio"),
        Phase("critic", "critic_loss", ("critic",)),
    )
    config_class = MethodConfig

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_contract(cls)  # a bad declaration fails at import, naming the method

    def __init__(self, generator, real_score, fake_score, text_encoder, vae, cfg: MethodConfig, latent_shape, **extra):
        super().__init__()
        self.generator, self.real_score, self.fake_score = generator, real_score, fake_score
        self.text_encoder, self.vae = text_encoder, vae
        for attr, module in extra.items():  # networks a method declares beyond the standard five
            setattr(self, attr, module)
        self.init_rollout(cfg, latent_shape)
        for frames in {cfg.num_training_frames, cfg.min_num_frames, cfg.max_num_frames}:
            self.pattern.check_clip(frames)
        self.rng: SampleRNG | None = None  # device draws, one stream per sample; set by reseed()
        self.host_rng = random.Random(0)  # host choices (exit steps, rollout length), agreed across ranks
        self._negative: torch.Tensor | None = None

    @classmethod
    def inference_generator(cls, backbone: dict, method: dict) -> WanDiT:
        """The network inference builds for this method's exported generator, before loading its weights
        strictly (engine/student.py): a WanDiT of the backbone config; a method whose generator holds more
        (DCM's two experts) builds that. method: the export's method node."""
        return WanDiT(**backbone)

    def export_parts(self, weights: dict[str, torch.Tensor]) -> dict:
        """What a method adds to the export of the generator's weights (engine/trainer.py; called on every rank):
        {} by default; "weights": more tensors of model.safetensors (DCM: an expert that did not train, so is
        not in the EMA), "adapter" / "adapter_config": a peft adapter file beside it (DCM's detail LoRA).
        weights: the exported state dict on the main rank, {} on the others."""
        return {}

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Clean latents [B, F, C, H, W] of a batch's clips: data latents, the teacher's clean end of each ODE
        pair, or pixel clips encoded by the VAE (DMD2's real clips, DCM's clips to noise)."""
        if "latents" in batch:
            return batch["latents"].to(self.device)
        if "ode" in batch:
            return batch["ode"][:, -1].to(self.device)
        if "video" in batch:
            with torch.no_grad():
                return self.vae.encode(batch["video"].to(self.device))
        raise KeyError(f"{type(self).__name__} needs clean clips (latents, ode or video) in the batch, got {sorted(batch)}")

    def reseed(self, seed: int, step: int, phase: str, sample_ids: list[int]) -> None:
        """Seed the draws of one (micro-)batch.

        Noise comes from one stream per sample, keyed by (seed, step, phase, global sample index),
        so a global batch gives the same draws however it is split into micro-batches and ranks,
        and a resumed run replays them. Host choices (rollout length, exit steps) come from
        (seed, step, phase): the same for every micro-batch of the step, and broadcast from rank 0.
        """
        self.rng = SampleRNG.for_samples(seed, step, phase, sample_ids, self.device)
        self.host_rng = random.Random(mix_seed(seed, step, phase))

    # ---------------------------------------------------------------- conditioning
    def negative(self, batch: int) -> torch.Tensor:
        """The negative-prompt embedding, computed once."""
        if self._negative is None:
            self._negative = self.encode([self.cfg.negative_prompt])
        return self._negative.expand(batch, *self._negative.shape[1:])

    # ---------------------------------------------------------------- generator
    def plan_rollout(self) -> tuple[int, list[int]]:
        """Rollout length and exit steps, drawn on rank 0 and broadcast, so all ranks agree."""
        cfg, block = self.cfg, self.pattern.num_frame_per_block
        lengths = list(range(cfg.min_num_frames, cfg.max_num_frames + 1, block))
        num_frames = self.host_rng.choice(lengths)
        exits = draw_exit_steps(
            len(chunk_starts(self.pattern, num_frames)),
            len(self.steps),
            same_step_across_blocks=cfg.same_step_across_blocks,
            last_step_only=cfg.last_step_only,
            rng=self.host_rng,
        )
        return broadcast_object((num_frames, exits))

    def generate(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """Self-rollout of the generator: (clip of the last num_training_frames, grad mask [F], denoised range)."""
        context = self.encode(batch["prompts"])
        num_frames, exits = self.plan_rollout()
        noise = self.rng.randn((context.shape[0], num_frames, *self.latent_shape))
        window = self.cfg.num_training_frames
        grad_from = next(s for s in reversed(chunk_starts(self.pattern, num_frames)) if s <= num_frames - window)
        out = rollout(
            self.generator, noise, context, self.steps, self.pattern, schedule=self.schedule, exit_steps=exits,
            grad_from_frame=grad_from, context_noise=self.cfg.context_noise, rng=self.rng,
        )
        return out.video[:, -window:], out.grad_mask[-window:], self.denoised_range(exits)

    def denoised_range(self, exits: list[int]) -> tuple[int, int] | None:
        """(from, to) in unwarped steps of the interval the exit step denoised (for ts_schedule)."""
        if not self.cfg.same_step_across_blocks:
            return None
        k = exits[0]
        t_from = self.schedule.unwarped_index(self.steps[k])
        t_to = 0 if k == len(self.steps) - 1 else self.schedule.unwarped_index(self.steps[k + 1])
        return t_from, t_to

    def block_step_index(self, batch: int, num_frames: int, low: int = 0, high: int | None = None) -> torch.Tensor:
        """[B, F] long: a random index in [low, high) per sample and block (same within a block); by default
        into the step list."""
        starts = chunk_starts(self.pattern, num_frames)
        index = self.rng.randint(low, len(self.steps) if high is None else high, (batch, len(starts)))
        lengths = torch.tensor([self.pattern.block_length(s) for s in starts], device=index.device)
        return index.repeat_interleave(lengths, dim=1)

    # ---------------------------------------------------------------- scores
    def x0(self, net, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.schedule.x0_from_flow(x_t, net(x_t, t, context), t)

    def guided_x0(self, net, x_t, t, cond, scale: float) -> torch.Tensor:
        """cond + scale (cond - uncond), the reference's CFG; scale 0 skips the unconditional call."""
        pred = self.x0(net, x_t, t, cond)
        if scale == 0:
            return pred
        return pred + scale * (pred - self.x0(net, x_t, t, self.negative(x_t.shape[0])))

    def score_timestep(self, batch: int, frames: int, denoised: tuple[int, int] | None,
                       above: bool | None = None, below: bool | None = None) -> torch.Tensor:
        """[B, F]: uniform in [low, high) per sample, shifted and clamped as the reference does.
        above / below: bound it by the rollout's denoised range (None: ts_schedule / ts_schedule_max)."""
        cfg, n = self.cfg, self.schedule.num_train_timesteps
        above = cfg.ts_schedule if above is None else above
        below = cfg.ts_schedule_max if below is None else below
        low = denoised[1] if above and denoised else cfg.min_score_timestep
        high = denoised[0] if below and denoised else n
        u = self.rng.randint(low, max(high, low + 1), (batch,))
        return self.schedule.score_timestep(
            u, frames, shift=cfg.timestep_shift if cfg.score_timestep_shift is None else cfg.score_timestep_shift,
            min_step=int(cfg.min_step_ratio * n), max_step=int(cfg.max_step_ratio * n)
        )

    # ---------------------------------------------------------------- losses
    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__} declares a generator phase but defines no generator_loss")

    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Flow-matching denoising loss of the fake score on the generator's (detached) samples."""
        with torch.no_grad():
            video, _, denoised = self.generate(batch)
        return self.denoising_loss(video, self.encode(batch["prompts"]), denoised)

    def denoising_loss(self, video: torch.Tensor, context: torch.Tensor, denoised=None) -> tuple[torch.Tensor, dict]:
        """Flow matching of the fake score on clean clips `video` (eq. 1 of Lipman et al.: ||v - (eps - x0)||^2)."""
        t = self.score_timestep(video.shape[0], video.shape[1], denoised)
        noise = self.rng.randn_like(video)
        flow = self.fake_score(self.schedule.add_noise(video, noise, t), t, context)
        loss = F.mse_loss(flow.float(), (noise - video).float())
        return loss, {"critic_loss": loss.detach(), "critic_timestep": t.mean().detach()}
