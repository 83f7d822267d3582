"""Euler sampling of a flow-matching teacher, optionally recording states (ODE pairs for initialisation)."""

from __future__ import annotations

from typing import Sequence

import torch

from model.schedule import shift_time


def sigma_grid(num_steps: int, shift: float, include: Sequence[float] = ()) -> list[float]:
    """Shifted sigmas from 1 to 0 ([num_steps + 1] points), plus the sigmas in `include`, descending."""
    grid = {float(shift_time(1 - i / num_steps, shift)) for i in range(num_steps + 1)}
    grid |= {float(s) for s in include}
    return sorted(grid, reverse=True)


@torch.no_grad()
def euler_sample(
    model,
    noise: torch.Tensor,
    sigmas: Sequence[float],
    context: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    record: Sequence[float] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x <- x + (s' - s) v(x, s) from sigmas[0] to sigmas[-1]; v = v_u + g (v_c - v_u) with an uncond context.

    model(x [B, F, C, H, W], timestep [B, F], context) -> flow. Returns the end state and the
    states at the sigmas in `record` (each must be on the grid), in that order.
    """
    grid = [float(s) for s in sigmas]
    missing = [s for s in record if float(s) not in grid]
    if missing:
        raise ValueError(f"record sigmas {missing} are not on the sampling grid")
    wanted = {float(s): i for i, s in enumerate(record)}
    states: list[torch.Tensor | None] = [None] * len(wanted)
    x = noise
    for s, s_next in zip(grid[:-1], grid[1:]):
        if s in wanted:
            states[wanted[s]] = x
        t = torch.full(x.shape[:2], s * 1000.0, device=x.device, dtype=torch.float32)
        v = model(x, t, context)
        if uncond is not None and guidance_scale != 1.0:
            v_u = model(x, t, uncond)
            v = v_u + guidance_scale * (v - v_u)
        x = x + (s_next - s) * v
    if grid[-1] in wanted:
        states[wanted[grid[-1]]] = x
    return x, states
