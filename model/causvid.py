"""CausVid: DMD on clips the causal generator denoises in one step from noised data, no self-rollout.

Each block of a data clip is noised to its own step of the step list (drawn per sample and block).
Diffusion forcing: the whole clip runs block-causally, each block seeing the noisy earlier blocks.
Teacher forcing: chunk by chunk through the KV cache, each block seeing the clean earlier blocks
(written at `context_noise`), exactly as the rollout writes its context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model.base import MethodConfig
from model.dmd import DMD
from model.wan.kv_cache import CrossAttnCache, KVCache
from pipeline.rollout import chunk_starts, denoise_chunk, write_context


@dataclass
class CausVidConfig(MethodConfig):
    teacher_forcing: bool = False  # clean context (True) or diffusion forcing on noisy context (False)


class CausVid(DMD):
    config_class = CausVidConfig
    cfg: CausVidConfig
    # both phases on data clips (clean latents, or pixel clips the VAE encodes), not on prompts alone
    phases = tuple(replace(p, data=("videos",)) for p in DMD.phases)

    def block_timesteps(self, batch: int, num_frames: int) -> torch.Tensor:
        """[B, F]: one step of the step list per sample and block."""
        return torch.tensor(self.steps, device=self.device)[self.block_step_index(batch, num_frames)]

    def denoise_data(self, latents: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        """The generator's x0 for every block of a noised data clip."""
        if not self.cfg.teacher_forcing:
            flow = self.generator(noisy, t, context, causal=self.pattern)
            return self.schedule.x0_from_flow(noisy, flow, t)
        b, frames, _, h, w = latents.shape
        cache = KVCache.for_model(self.generator, self.pattern, batch_size=b, latent_hw=(h, w), max_frames=frames)
        cross = CrossAttnCache(self.generator.config.num_layers)
        outputs, starts = [], chunk_starts(self.pattern, frames)
        for start in starts:
            end = start + self.pattern.block_length(start)
            outputs.append(denoise_chunk(self.generator, noisy[:, start:end], t[:, start:end], context, start,
                                         schedule=self.schedule, kv_cache=cache, crossattn_cache=cross))
            if start != starts[-1]:  # the clean block becomes the context of the next ones
                write_context(self.generator, latents[:, start:end], context, start, schedule=self.schedule,
                              context_noise=self.cfg.context_noise, rng=self.rng, kv_cache=cache, crossattn_cache=cross)
        return torch.cat(outputs, dim=1)

    def generate(self, batch: dict):
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
        else:  # pixel clips from the data set
            with torch.no_grad():
                latents = self.vae.encode(batch["video"].to(self.device))
        b, frames = latents.shape[:2]
        if frames != self.cfg.num_training_frames:
            raise ValueError(f"data clips have {frames} latent frames, expected num_training_frames={self.cfg.num_training_frames}")
        context = self.encode(batch["prompts"])
        t = self.block_timesteps(b, frames)
        noise = self.rng.randn_like(latents)
        video = self.denoise_data(latents, self.schedule.add_noise(latents, noise, t), t, context)
        return video, torch.ones(frames, dtype=torch.bool), None
