"""Wan's flow-matching noise schedule: x_t = (1 - s) x0 + s eps with s = t / 1000, and its helpers.

Timesteps are in [0, 1000]. A network predicts the flow v = eps - x0, so x0 = x_t - s v.
`shift` warps a uniform time u onto the schedule Wan samples with: s = shift u / (1 + (shift - 1) u).
"""

from __future__ import annotations

from typing import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_time(u, shift: float):
    """Map uniform time u in [0, 1] to the shifted sigma (works on floats and tensors)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_time(s, shift: float):
    """Inverse of shift_time."""
    return s / (shift - (shift - 1) * s)


RENOISE = ("fresh", "implied")  # how a few-step sampler goes from one step's x0 prediction to the next step


class FlowSchedule:
    """renoise: how the few-step sampler (pipeline/rollout.py) re-noises an x0 prediction to the next step:
    "fresh" with new noise (Self Forcing's consistency sampler), "implied" with the noise the state and the
    prediction imply (deterministic: DDIM, i.e. an Euler step of the flow; phased consistency models, DCM)."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, renoise: str = "fresh"):
        if shift <= 0:
            raise ValueError(f"timestep shift must be > 0, got {shift}")
        if renoise not in RENOISE:
            raise ValueError(f"renoise={renoise!r}: expected one of {RENOISE}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.renoise = renoise

    # ---------------------------------------------------------------- steps
    def warp(self, steps: Sequence[float]) -> list[float]:
        """Warp a step list onto the shifted schedule, as the Self-Forcing reference does.

        A step t is read as uniform time u = t / 1000 and moved to 1000 * shift_time(u): with shift 5,
        [1000, 750, 500, 250] becomes [1000, 937.5, 833.3, 625].
        """
        n = self.num_train_timesteps
        return [float(n * shift_time(t / n, self.shift)) for t in steps]

    def denoising_steps(self, steps: Sequence[float], warp: bool) -> list[float]:
        steps = [float(t) for t in steps]
        if not steps or any(not 0 < t <= self.num_train_timesteps for t in steps):
            raise ValueError(f"denoising_step_list must hold timesteps in (0, 1000], got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising_step_list must be strictly decreasing, got {steps}")
        return self.warp(steps) if warp else steps

    def unwarped_index(self, t: float) -> int:
        """The uniform-time step (0..1000) whose shifted timestep is t: the denoised range for ts_schedule."""
        n = self.num_train_timesteps
        return int(round(n * unshift_time(t / n, self.shift)))

    # ---------------------------------------------------------------- noise
    def sigma(self, t):
        return t / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t for a float t or a per-frame tensor t of shape [B, F] (x: [B, F, C, H, W])."""
        s = self._broadcast(self.sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def next_state(self, x_t: torch.Tensor, x0: torch.Tensor, t, t_next, fresh_noise) -> torch.Tensor:
        """The state at t_next after the prediction x0 at state x_t, timestep t: x0 re-noised with
        `fresh_noise()`, or (renoise="implied") with eps = (x_t - (1 - s) x0) / s, which makes the step
        x_t + (s_next - s) v exactly: Euler on the predicted flow v = (x_t - x0) / s. t, t_next: floats or [B, F]."""
        if self.renoise == "fresh":
            return self.add_noise(x0, fresh_noise(), t_next)
        s = self._broadcast(self.sigma(t), x0)
        return self.add_noise(x0, (x_t - (1 - s) * x0) / s, t_next)

    def x0_from_flow(self, x_t: torch.Tensor, flow: torch.Tensor, t) -> torch.Tensor:
        """x0 = x_t - s v, computed in float64 (as the reference does) and returned in x_t's dtype."""
        s = self._broadcast(self.sigma(t), x_t, torch.float64)
        return (x_t.double() - s * flow.double()).to(x_t.dtype)

    @staticmethod
    def _broadcast(s, like: torch.Tensor, dtype=None):
        if isinstance(s, torch.Tensor):
            return s.to(dtype or like.dtype).reshape(*s.shape, *([1] * (like.ndim - s.ndim)))
        return s

    # ---------------------------------------------------------------- sampling
    def score_timestep(self, u: torch.Tensor, frames: int, *, shift: float, min_step: int, max_step: int) -> torch.Tensor:
        """A score/critic timestep per sample, uniform over its frames: [B, F] float.

        u: [B] integers drawn uniformly in [low, high) by the caller; warped by `shift` when
        shift > 1, then clamped to [min_step, max_step], in the reference's order.
        """
        t = u.float()[:, None].expand(u.shape[0], frames)
        if shift > 1:
            n = self.num_train_timesteps
            t = n * shift_time(t / n, shift)
        return t.clamp(min_step, max_step)
