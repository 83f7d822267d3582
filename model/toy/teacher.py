"""The exact teacher: the toy world's posterior-mean denoiser, in Wan's flow-matching form.

Noise model (Wan flow matching): x_t = (1 - s) x0 + s eps, eps ~ N(0, I), s = timestep / 1000.
The data are a finite set of equally likely templates, so the best denoiser is exact:

    log w_k = sum_f log N(x_t^f; (1 - s_f) x0_k^f, s_f^2 I)        (per-frame noise levels)
    x0_hat  = sum_k softmax(log w)_k x0_k

over the templates of the prompt a batch row is conditioned on, or over all templates of the
world for the empty prompt (so classifier-free guidance has a real unconditional branch). A frame
at s = 1 carries no information: its term is the same for every k and drops out of the softmax.
"""

import torch

from model.toy.text_encoder import ToyTextEncoder
from model.toy.world import ToyWorld

# Smallest noise level divided by. Below s = 1e-4 (timestep 0.1) the noise is four orders of
# magnitude under the template spacing, so the posterior is already one template; the clamp only
# keeps s = 0 (the clean end of the schedule) from dividing by zero.
S_MIN = 1e-4


def timestep_to_sigma(timestep: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """Timesteps [], [B] or [B, F] in [0, 1000] -> noise levels s [B, F], float64."""
    t = torch.as_tensor(timestep, dtype=torch.float64)
    shape = tuple(t.shape)
    if shape not in ((), (batch,), (batch, frames)):
        raise ValueError(f"timestep must be [B], [B, F] or a scalar for x of batch {batch} and "
                         f"{frames} frames, got shape {shape}")
    t = t[:, None] if t.ndim == 1 else t
    s = (t / 1000.0).expand(batch, frames)
    if (s < 0).any() or (s > 1).any():
        raise ValueError("timesteps must lie in [0, 1000]")
    return s


def log_posterior(x_t: torch.Tensor, sigma: torch.Tensor, templates: torch.Tensor,
                  s_min: float = S_MIN) -> torch.Tensor:
    """Log weights log w_k up to a per-row constant: [B, K].

    x_t: [B, F, N] and templates: [K, F, N] (N = C * H * W), sigma: [B, F], all float64.
    ||x_t - a x0_k||^2 = ||x_t||^2 - 2 a <x_t, x0_k> + a^2 ||x0_k||^2; the first term is the
    same for every k and is left out (softmax ignores it), and no [B, K, F, N] tensor is built
    (the unconditional branch has every template as a k).
    """
    a = 1.0 - sigma                                                   # signal scale [B, F]
    var = sigma.clamp_min(s_min) ** 2
    cross = torch.einsum("bfn,kfn->bkf", x_t, templates)
    t_sq = (templates * templates).sum(-1)                            # [K, F]
    return ((2 * a[:, None] * cross - (a * a)[:, None] * t_sq) / (2 * var[:, None])).sum(-1)


class ExactTeacher(torch.nn.Module):
    """Posterior-mean denoiser with the Wan backbone's call: forward(x, timestep, context) -> v.

    x: [B, F, C, H, W]; timestep: [B, F] or [B] in [0, 1000]; context: the toy text encoder's
    prompt_embeds [B, L, D]. Returns the flow v = eps_hat - x0_hat, so x_t - s v = x0_hat.
    Any number of frames works: templates are rendered for the length asked for.
    """

    def __init__(self, world: ToyWorld, text_encoder: ToyTextEncoder, s_min: float = S_MIN,
                 match_tol: float = 1.0):
        super().__init__()
        self.world, self.s_min, self.match_tol = world, s_min, match_tol
        self.text_len, self.text_dim = text_encoder.text_len, text_encoder.text_dim
        # Row p holds prompt p's embeddings; the last row is the empty prompt (all zeros).
        table = text_encoder(world.prompts + [""])["prompt_embeds"].detach().clone()
        self.register_buffer("prompt_table", table, persistent=False)
        self._templates: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.weight_fn = None  # round_weights: the templates' values at a storage precision

    def round_weights(self, fn) -> None:
        """Hold the templates as `fn` rounds them (engine/quantize.py: bf16, or torchao's per-row int8 / fp8).
        They are the matrix of both products of the posterior mean (x_t . x0_k, then sum_k w_k x0_k), so
        each (template, frame) row is one output row of a linear layer's weight; the arithmetic stays float64."""
        self.weight_fn = fn
        self._templates.clear()

    @property
    def unconditional(self) -> int:
        """The group index of the empty prompt: the posterior runs over every template."""
        return len(self.world.prompts)

    def decode_prompts(self, context: torch.Tensor) -> list[int]:
        """The prompt index of each row of context [B, L, D], or `unconditional` for ""."""
        if context.ndim != 3 or tuple(context.shape[1:]) != (self.text_len, self.text_dim):
            raise ValueError(f"context must be toy prompt_embeds [B, {self.text_len}, "
                             f"{self.text_dim}], got {tuple(context.shape)}")
        # Euclidean distance to each known embedding; distinct prompts are >= sqrt(text_dim)
        # apart (one word differs by two orthogonal vectors of norm sqrt(D), or by one).
        table = self.prompt_table.to(context.device).flatten(1)
        gap = torch.cdist(context.float().flatten(1), table)                 # [B, P + 1]
        best, idx = gap.min(dim=1)
        bad = (best > self.match_tol).nonzero().flatten().tolist()
        if bad:
            b = bad[0]
            near = ([*self.world.prompts, ""])[idx[b]]
            raise ValueError(f"context rows {bad} match no toy prompt (row {b} is closest to "
                             f"{near!r}, distance {best[b]:.3g} > {self.match_tol}); "
                             f"the exact teacher knows only the toy text encoder's embeddings "
                             f"of the {len(self.world.prompts)} toy prompts and of \"\"")
        return idx.tolist()

    def templates(self, num_frames: int, device: torch.device) -> torch.Tensor:
        """All templates flattened per frame, [P * K, F, C * H * W] float64 on `device`."""
        key = (num_frames, torch.device(device))
        if key not in self._templates:
            videos, _ = self.world.all_templates(num_frames)
            rows = videos.flatten(2)  # [P * K, F, C * H * W]
            if self.weight_fn is not None:
                rows = self.weight_fn(rows.flatten(0, 1).float()).view(rows.shape)
            self._templates[key] = rows.to(device=device, dtype=torch.float64)
        return self._templates[key]

    def _inputs(self, x: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, F, C, H, W] -> x_t [B, F, C * H * W] float64, and noise levels s [B, F]."""
        frame = (self.world.channels, self.world.height, self.world.width)
        if x.ndim != 5 or tuple(x.shape[2:]) != frame:
            raise ValueError(f"x must be [B, F, {frame[0]}, {frame[1]}, {frame[2]}] clips of "
                             f"the toy world, got {tuple(x.shape)}")
        sigma = timestep_to_sigma(torch.as_tensor(timestep, device=x.device), *x.shape[:2])
        return x.flatten(2).to(torch.float64), sigma

    def x0(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The posterior mean E[x0 | x_t, prompt], same shape and dtype as x [B, F, C, H, W]."""
        x_t, sigma = self._inputs(x, timestep)
        return self._x0(x_t, sigma, context).view_as(x).to(x.dtype)

    def _x0(self, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x_t.is_cuda:
            return self._x0_gathered(x_t, sigma, context)
        groups = torch.tensor(self.decode_prompts(context), device=x_t.device)
        templates = self.templates(x_t.shape[1], x_t.device)
        k = self.world.templates_per_prompt
        x0 = torch.empty_like(x_t)
        # Rows of one prompt share a template set; looping over prompts keeps the work at
        # B * K templates instead of B * P * K.
        for g in groups.unique().tolist():
            rows = (groups == g).nonzero().flatten()
            own = templates if g == self.unconditional else templates[g * k:(g + 1) * k]
            w = torch.softmax(log_posterior(x_t[rows], sigma[rows], own, self.s_min), dim=-1)
            x0[rows] = torch.einsum("bk,kfn->bfn", w, own)
        return x0

    def _x0_gathered(self, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The same posterior mean with a fixed number of kernels per call (for GPUs, where the
        per-prompt loop above launches and syncs ~50 times per call): each row gathers its own
        prompt's K templates; rows of the empty prompt use all templates."""
        groups = self.decode_prompts(context)
        templates = self.templates(x_t.shape[1], x_t.device)
        k, p = self.world.templates_per_prompt, len(self.world.prompts)
        uncond = torch.tensor([g == self.unconditional for g in groups], device=x_t.device)
        own = templates.view(p, k, *templates.shape[1:])[torch.tensor(groups, device=x_t.device).clamp(max=p - 1)]
        cross = torch.einsum("bfn,bkfn->bkf", x_t, own)
        a, var = 1.0 - sigma, sigma.clamp_min(self.s_min) ** 2
        log_w = ((2 * a[:, None] * cross - (a * a)[:, None] * (own * own).sum(-1)) / (2 * var[:, None])).sum(-1)
        x0 = torch.einsum("bk,bkfn->bfn", torch.softmax(log_w, dim=-1), own)
        if bool(uncond.any()):
            w = torch.softmax(log_posterior(x_t, sigma, templates, self.s_min), dim=-1)
            x0 = torch.where(uncond[:, None, None], torch.einsum("bk,kfn->bfn", w, templates), x0)
        return x0

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, F, C, H, W]; the flow v = eps_hat - x0_hat = (x_t - x0_hat) / s.
        x_t, sigma = self._inputs(x, timestep)
        x0 = self._x0(x_t, sigma, context)
        v = (x_t - x0) / sigma.clamp_min(self.s_min)[..., None]  # out-of-place: SiD differentiates through it
        return v.view_as(x).to(x.dtype)
