"""DCM: the Dual-Expert Consistency Model (Lv et al., 2025, arXiv 2506.03123), as one method with two stages.

Phased consistency distillation (PCM, Wang et al., 2024) of the teacher's probability-flow ODE. The ODE runs on
Euler's grid s_j = shift(j / N), j = 0..N (N = euler_steps, `shift` the schedule's: 17 for Wan as the reference;
s_N = 1 is noise, s_0 = 0 the clean clip), with the guided velocity

    v = v_u + w (v_c - v_u),   w = 1 + guidance_scale        (= v_c + g (v_c - v_u): the reference's distill_cfg g)

and one Euler step goes from s_j to s_{j-1}: x_{j-1} = x_j + (s_{j-1} - s_j) v(x_j, s_j).

Two experts split the grid at k = round(boundary N) (the reference: 35 of 50): the semantic expert takes the
points j in (k, N] (high noise), the detail expert those in (0, k]. Each expert's range (lo, hi] is cut into
`multiphase` phases at the edges lo + floor(m (hi - lo) / multiphase); a point jumps to e(j), the largest edge
below it (multiphase = 1, the reference's: the semantic expert jumps to the boundary, the detail expert to 0).
A clean clip x0 (data) is noised to x_j = (1 - s_j) x0 + s_j eps; the student's jump and its target are

    x̂_e = x_j + (s_e - s_j) v_θ(x_j, s_j)                                   (PCM's parameterisation)
    x_e  = x_{j-1} + (s_e - s_{j-1}) v_θ⁻(x_{j-1}, s_{j-1})                  (θ⁻ one teacher step later, no gradient)

(x_e = x_{j-1} itself when j - 1 = e). θ⁻ is the live student θ under stop-gradient (target_decay = 0: the reference's
Wan scripts, which pass no --use_ema), or with target_decay = d > 0 an EMA of θ of its own, θ⁻ <- d θ⁻ + (1 - d) θ
once a step (ConsistencyTarget), apart from the run's exported EMA (ema_weight). Loss: pseudo-Huber
mean(sqrt((x̂_e - x_e)^2 + c^2) - c), c = 0.001 as the reference; the semantic expert adds the temporal-coherence
term (DCM Sec. 3.3), the MSE between differences of latent frames `temporal_gap` apart, Δx[f] = x[f + gap] - x[f],
of x̂_e and of x_e. Every phase's upper end must be one of the student's steps (denoising_step_list), so that the
step before it lands on its phase's end.

The detail expert is a peft LoRA on the semantic expert's attention (rank 128, alpha 256 as the reference) plus
its own copies of the time embedding and the output projection (DualExpertDiT, model/wan/dual_expert.py). Its loss adds a GAN term
(DCM Sec. 3.4): both jumps are re-noised to a level s_a drawn above the phase end,
x_a = ((1 - s_a) x + (s_a - s_e) eps') / (1 - s_e) (the reference's formula), the frozen teacher's hidden
states of a few blocks are read from each (WanDiT(..., features=blocks)), and a discriminator head
(model/wan/discriminator.py, as DMD2's) scores them with hinge losses:

    generator:      adv_weight (hinge_weight mean relu(1 - D(fake)) + feature_weight Σ_b mse(LN(h_b^fake), LN(h_b^real)))
    discriminator:  discriminator_weight (mean relu(1 + D(fake)) + mean relu(1 - D(real)))

method.mode: `semantic` trains the semantic expert, `fine` the detail expert on a semantic one (model.generator_init),
`both` the semantic expert for `semantic_steps` steps, then the detail expert, in one run. Inference: the exported
DualExpertDiT picks the expert by timestep (detail at or below the boundary), and renoise=implied makes the
rollout's steps Euler steps along the student's jumps, the reference's sampler.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from model.base import MethodConfig, SelfForcingModel
from model.contract import Network, Phase
from model.schedule import shift_time, unshift_time
from model.wan.discriminator import DESIGNS, DiscriminatorHead, default_blocks
from model.wan.dual_expert import DETAIL_TARGETS, DualExpertDiT, adapter_parts, is_detail
from model.wan.transformer import WanDiT
from model.wan.weights import backbone_config, load_strict, read_state_dict
from pipeline.rollout import chunk_starts
from utils.ema import clean_name
from utils.fsdp import reshard

MODES = ("semantic", "fine", "both")


# ---------------------------------------------------------------------------- config
@dataclass
class DetailConfig:
    rank: int = 128  # the detail expert's LoRA rank (the reference's lora_rank)
    alpha: float = 256.0  # its scale is alpha / rank (the reference's lora_alpha)
    targets: list[str] = field(default_factory=lambda: list(DETAIL_TARGETS))  # attention q, k, v, o (peft names)
    dropout: float = 0.0  # peft's lora_dropout

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"method.detail.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"method.detail.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"method.detail.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("method.detail.targets must name at least one linear layer (e.g. attn1.to_q)")


@dataclass
class DCMGANConfig:
    adv_weight: float = 0.1  # the GAN part's weight in the detail expert's loss (the reference's adv_weight)
    hinge_weight: float = 5.0  # inside it: the generator's hinge term mean relu(1 - D(fake)) (the reference's 5)
    feature_weight: float = 10.0  # inside it: feature matching on the teacher's hidden states (the reference's 10)
    discriminator_weight: float = 1.0  # on the discriminator's hinge loss
    blocks: list[int] | None = None  # teacher blocks the head reads (null: three from the middle to the last; Wan-1.3B: [13, 21, 29])
    head: str = "registers"  # registers: a learned token per block cross-attends to its tokens; pool: mean over tokens
    width: int | None = None  # the classifier MLP's hidden width (null: the teacher's width)
    heads: int | None = None  # attention heads of the register summaries (null: the teacher's)

    def __post_init__(self):
        if self.head not in DESIGNS:
            raise ValueError(f"method.gan.head={self.head!r}: expected one of {DESIGNS}")
        for key in ("adv_weight", "hinge_weight", "feature_weight", "discriminator_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.gan.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class DCMConfig(MethodConfig):
    mode: str = "semantic"  # semantic | fine (the detail expert on model.generator_init) | both (semantic, then detail)
    semantic_steps: int = 0  # mode=both: steps of the semantic stage; the detail stage trains from then on
    euler_steps: int = 50  # N, the teacher's Euler steps from noise to data (the reference's num_euler_timesteps)
    multiphase: int = 1  # phases per expert (the reference: 1)
    target_decay: float = 0.0  # θ⁻'s EMA decay (not the exported EMA's ema_weight); 0: the live student, no gradient (the reference)
    boundary: float = 0.7  # the experts' split of the Euler grid in uniform time: k = round(boundary N) (the reference: 35 / 50)
    huber_c: float = 0.001  # c of the pseudo-Huber loss
    temporal_weight: float = 1.0  # the semantic expert's temporal-coherence term
    temporal_gap: int = 3  # frames apart of its differences (the reference: 3)
    detail: DetailConfig = field(default_factory=DetailConfig)
    gan: DCMGANConfig = field(default_factory=DCMGANConfig)
    # MethodConfig's knobs at DCM's values: 4 steps, 2 per expert, the boundary (0.7 x 1000) one of them, so the
    # semantic expert's last step lands on its phase end; the reference's shift 17 and CFG; a bidirectional student
    # (one block of the 21 latent frames); deterministic Euler sampling along the student's jumps.
    denoising_step_list: list[float] = field(default_factory=lambda: [1000, 850, 700, 350])
    timestep_shift: float = 17.0
    guidance_scale: float = 5.0
    num_frame_per_block: int = 21
    renoise: str = "implied"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.detail, dict):
            self.detail = DetailConfig(**self.detail)
        if isinstance(self.gan, dict):
            self.gan = DCMGANConfig(**self.gan)
        if self.mode not in MODES:
            raise ValueError(f"method.mode={self.mode!r}: expected one of {MODES}")
        if not 0 < self.boundary < 1:
            raise ValueError(f"method.boundary must be in (0, 1) (the experts' split in uniform time), got {self.boundary}")
        if self.euler_steps < 2:
            raise ValueError(f"method.euler_steps must be >= 2 (one Euler step per expert at least), got {self.euler_steps}")
        if self.multiphase < 1:
            raise ValueError(f"method.multiphase must be >= 1, got {self.multiphase}")
        k, n = self.split, self.euler_steps
        if not 0 < k < n:
            raise ValueError(f"method.boundary={self.boundary} x method.euler_steps={n} rounds to {k}, leaving an "
                             f"expert no Euler step: the split must be in 1..{n - 1}")
        if self.multiphase > min(k, n - k):
            raise ValueError(f"method.multiphase={self.multiphase} is more phases than an expert has Euler steps "
                             f"(semantic {n - k}, detail {k} of method.euler_steps={n}); lower it or raise euler_steps")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"method.target_decay must be in [0, 1) (0: the live student is the consistency target), "
                             f"got {self.target_decay}")
        missing = self.unstepped_tops()
        if missing:
            expected = [self.step_of(j) for j in self.phase_tops]
            raise ValueError(f"method.denoising_step_list={list(self.denoising_step_list)} misses the upper end of a phase "
                             f"({[self.step_of(j) for j in missing]}: grid points {missing} of method.euler_steps="
                             f"{self.euler_steps}), so a step would not land on its phase's end; with method.multiphase="
                             f"{self.multiphase} and method.boundary={self.boundary} the steps must include {expected}, "
                             f"e.g. method.denoising_step_list={expected}")
        if self.mode == "both" and self.semantic_steps < 1:
            raise ValueError(f"method.semantic_steps must be >= 1 with method.mode=both (the steps before the detail "
                             f"stage), got {self.semantic_steps}")
        if self.semantic_steps < 0:
            raise ValueError(f"method.semantic_steps must be >= 0, got {self.semantic_steps}")
        if self.temporal_gap < 1:
            raise ValueError(f"method.temporal_gap must be >= 1, got {self.temporal_gap}")
        if self.huber_c <= 0:
            raise ValueError(f"method.huber_c must be > 0, got {self.huber_c}")
        if self.temporal_weight < 0:
            raise ValueError(f"method.temporal_weight must be >= 0, got {self.temporal_weight}")

    @property
    def split(self) -> int:
        """k: the detail expert's grid points are 1..k, the semantic expert's k+1..N."""
        return round(self.boundary * self.euler_steps)

    @property
    def phase_tops(self) -> list[int]:
        """The grid points where a phase begins from above, high to low: N and every phase edge above 0. A step of
        the student at each of them makes the step before it land on its phase's end (PCM's sampling)."""
        n, k = self.euler_steps, self.split
        edges = phase_edges(k, n, self.multiphase) + phase_edges(0, k, self.multiphase)
        return sorted({n, *edges} - {0}, reverse=True)

    def step_of(self, j: int) -> float:
        """Grid point j as a denoising_step_list entry (uniform time x 1000 when the list is warped, else shifted)."""
        u = j / self.euler_steps
        return round(1000.0 * (u if self.warp_denoising_step else float(shift_time(u, self.timestep_shift))), 2)

    def unstepped_tops(self) -> list[int]:
        """Phase tops no step sits on (to half a timestep in uniform time)."""
        steps = [float(t) / 1000 for t in self.denoising_step_list]
        uniform = steps if self.warp_denoising_step else [float(unshift_time(s, self.timestep_shift)) for s in steps]
        return [j for j in self.phase_tops if min(abs(u - j / self.euler_steps) for u in uniform) > 0.5e-3]

    @property
    def boundary_timestep(self) -> float:
        """The switch: timesteps at or below it go to the detail expert (1000 s_k)."""
        return 1000.0 * float(shift_time(self.split / self.euler_steps, self.timestep_shift))


def dcm_config(node) -> DCMConfig:
    """DCMConfig from a method node (a DictConfig or a plain dict, with or without _target_)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return DCMConfig(**{k: v for k, v in node.items() if k != "_target_"})


# ---------------------------------------------------------------------------- the grid, phases and losses
def euler_sigmas(n: int, shift: float) -> torch.Tensor:
    """s_j = shift(j / n) for j = 0..n: float64 [n + 1], s_0 = 0 (clean), s_n = 1 (noise)."""
    return shift_time(torch.arange(n + 1, dtype=torch.float64) / n, shift)


def phase_edges(lo: int, hi: int, phases: int) -> list[int]:
    """The start points of `phases` phases over the grid points (lo, hi]: lo + floor(m (hi - lo) / phases)."""
    return [lo + m * (hi - lo) // phases for m in range(phases)]


def phase_end(j: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """The largest edge below each grid point j (every j > edges[0]): where a point's phase ends."""
    e = torch.tensor(edges, device=j.device, dtype=j.dtype)
    return e[(j[..., None] > e).sum(-1) - 1]


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c): the consistency loss (PCM / DCM)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).mean()


def temporal_loss(pred: torch.Tensor, target: torch.Tensor, gap: int) -> torch.Tensor:
    """MSE between the frame differences x[:, f + gap] - x[:, f] of pred and target ([B, F, ...]); 0 when F <= gap."""
    if pred.shape[1] <= gap:
        return pred.new_zeros((), dtype=torch.float32)
    diff = lambda x: x[:, gap:].float() - x[:, :-gap].float()  # noqa: E731
    return F.mse_loss(diff(pred), diff(target))


def renoise(x: torch.Tensor, noise: torch.Tensor, s_from: torch.Tensor, s_to: torch.Tensor) -> torch.Tensor:
    """A state at level s_from taken to the higher level s_to: ((1 - s_to) x + (s_to - s_from) eps) / (1 - s_from)
    (the reference's formula for the discriminator's inputs). s_from, s_to: broadcastable to x."""
    return ((1 - s_to) * x + (s_to - s_from) * noise) / (1 - s_from)


def hinge_generator_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """mean relu(1 - D(fake)) (the reference's generator term)."""
    return F.relu(1 - fake_logit.float()).mean()


def hinge_discriminator_loss(fake_logit: torch.Tensor, real_logit: torch.Tensor) -> torch.Tensor:
    """mean relu(1 + D(fake)) + mean relu(1 - D(real)): hinge loss, real labelled +1."""
    return F.relu(1 + fake_logit.float()).mean() + F.relu(1 - real_logit.float()).mean()


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Σ over blocks of the MSE between layer-normalised hidden states [B, L, D] (scale-free across blocks)."""
    norm = lambda h: F.layer_norm(h.float(), h.shape[-1:])  # noqa: E731
    return sum(F.mse_loss(norm(f), norm(r)) for f, r in zip(fake, real))


# ---------------------------------------------------------------------------- the generator: two experts in one DiT
class ConsistencyTarget(nn.Module):
    """θ⁻ for method.target_decay = d > 0: a copy of the generator (both experts) folded towards it once a step,
    θ⁻ <- d θ⁻ + (1 - d) θ, before the step's losses (so d = 0 would be θ itself). Not a WanDiT itself, so the engine
    keeps it in fp32, as an EMA's shadow (bf16 would not register a 1e-6 step); sharded like the generator (FSDP
    finds the same blocks), so the fold is shard-local. `folded` (the last step folded in) is checkpointed with it.
    With d = 0 it holds no copy (`net` None: the live student is the target), only that counter."""

    def __init__(self, generator: DualExpertDiT | None, decay: float, compute: torch.dtype = torch.float32):
        super().__init__()
        self.net = None if generator is None else copy.deepcopy(generator).float()
        if self.net is not None:
            self.net.autocast_dtype = None if compute == torch.float32 else compute
        self.decay = decay
        self.register_buffer("folded", torch.tensor(-1, dtype=torch.long))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.net(*args, **kwargs)  # through the container, whose FSDP root gathers the weights outside the blocks

    @torch.no_grad()
    def fold(self, generator: nn.Module, step: int) -> None:
        """Fold in the generator's current weights (those after step - 1's update), once per step."""
        if self.net is None or step <= int(self.folded):
            return
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (a DTensor's shard)
        theirs = {clean_name(n): p for n, p in generator.named_parameters()}
        mine = [(local(p), local(theirs[clean_name(n)])) for n, p in self.net.named_parameters()]
        torch._foreach_lerp_([m for m, _ in mine], [t.float() for _, t in mine], 1.0 - self.decay)
        self.folded.fill_(step)
        reshard(self.net)  # a unit kept gathered since its last forward would hold the old weights


# ---------------------------------------------------------------------------- builders of DCM's networks
def _backbone(cfg) -> dict:
    """The Wan DiT config: model.backbone, or the transformer config of the Wan folder model.path."""
    return backbone_config(OmegaConf.to_container(cfg.model.backbone, resolve=True), cfg.model.path)


def build_generator(cfg, built: dict) -> DualExpertDiT:
    dcm, m = dcm_config(cfg.method), cfg.model
    lora = m.lora.get("generator")
    if lora is not None and lora.rank > 0:
        raise ValueError(f"model.lora.generator.rank={lora.rank}: DCM's detail expert is its own LoRA "
                         "(method.detail.rank / alpha / targets) on a fully trained semantic expert; set it to 0")
    if dcm.mode == "fine" and m.generator_init is None:
        raise ValueError("method.mode=fine trains the detail expert on a semantic expert, but model.generator_init is "
                         "null: pass a semantic-stage export (its model.safetensors), or use method.mode=both")
    net = DualExpertDiT(**_backbone(cfg)).add_detail_expert(dcm.boundary_timestep, dcm.detail)
    if m.generator_init is not None:
        net.load_weights(read_state_dict(m.generator_init), str(m.generator_init))
    return net


def build_feature_net(cfg, built: dict) -> nn.Module:
    """The frozen Wan network whose hidden states the discriminator reads, when it is not the teacher itself
    (a Wan teacher: an empty placeholder): for a teacher without hidden states (the toy world's exact one),
    model.critic_init's network (the toy preset: its bidirectional toy denoiser). mode=semantic needs none."""
    if dcm_config(cfg.method).mode == "semantic" or isinstance(built["teacher"], WanDiT):
        return nn.Module()
    init = cfg.model.critic_init
    if init == "teacher":
        raise ValueError(f"method=dcm's discriminator reads a Wan network's hidden states, and the teacher "
                         f"({type(built['teacher']).__name__}) has none: set model.critic_init to a Wan denoiser's "
                         "weights (the toy preset: assets/toy/denoiser.safetensors), generator or random")
    net = WanDiT(**_backbone(cfg))
    if init == "generator":
        load_strict(net, built["generator"].semantic_state_dict(), "the generator's initial weights")
    elif init != "random":
        load_strict(net, read_state_dict(init), str(init))
    return net


def build_target(cfg, built: dict) -> ConsistencyTarget:
    """θ⁻'s own copy when method.target_decay > 0; else none (the live student is the target)."""
    decay = dcm_config(cfg.method).target_decay
    generator = built["generator"] if decay > 0 else None
    return ConsistencyTarget(generator, decay, getattr(torch, cfg.model.dtype))  # model.dtype: float32 | bfloat16


def feature_blocks(gan: DCMGANConfig, depth: int) -> list[int]:
    blocks = default_blocks(depth) if gan.blocks is None else list(gan.blocks)
    bad = [i for i in blocks if not 0 <= i < depth]
    if not blocks or bad:
        raise ValueError(f"method.gan.blocks={blocks}: the network the discriminator reads has {depth} blocks, so "
                         f"indices must be in 0..{depth - 1}")
    return blocks


def build_discriminator(cfg, built: dict) -> nn.Module:
    """DMD2's head on the feature network's blocks; mode=semantic trains none (a one-weight placeholder)."""
    dcm = dcm_config(cfg.method)
    net = built["teacher"] if isinstance(built["teacher"], WanDiT) else built["feature_net"]
    if dcm.mode == "semantic":
        return nn.Linear(1, 1)
    config = net.config
    blocks = feature_blocks(dcm.gan, config.num_layers)
    dim = config.num_attention_heads * config.attention_head_dim
    return DiscriminatorHead(dim, len(blocks), dcm.gan.head, dcm.gan.width, dcm.gan.heads or config.num_attention_heads,
                             config.eps)


# ---------------------------------------------------------------------------- the method
class DCM(SelfForcingModel):
    config_class = DCMConfig
    cfg: DCMConfig
    networks = {
        **{k: v for k, v in SelfForcingModel.networks.items() if k in ("text_encoder", "vae", "teacher")},
        "generator": Network("generator", build=build_generator, trained=True, ema=True),
        "target": Network("consistency_target", build=build_target, state=True),
        "feature_net": Network("feature_net", build=build_feature_net),
        "discriminator": Network("discriminator", build=build_discriminator, trained=True, blocks=()),
    }
    # Both phases start from clean clips: encoded latents, the clean ends of ODE pairs, or the toy world's templates.
    phases = (
        Phase("generator", "generator_loss", ("generator",), data=("videos|ode_pairs",)),
        Phase("discriminator", "discriminator_loss", ("discriminator",), data=("videos|ode_pairs",),
              when="detail_stage"),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        n, k = cfg.euler_steps, cfg.split
        self.sigmas = euler_sigmas(n, cfg.timestep_shift)
        self.ranges = {"semantic": (k, n), "detail": (0, k)}
        self.edges = {e: phase_edges(lo, hi, cfg.multiphase) for e, (lo, hi) in self.ranges.items()}
        self.step = 0
        # An expert its mode never trains stays out of the optimizer and the EMA (mode=both switches in its losses).
        if cfg.mode != "both":
            self.train_expert("detail" if cfg.mode == "fine" else "semantic")

    @classmethod
    def inference_generator(cls, backbone: dict, method: dict) -> DualExpertDiT:
        dcm = dcm_config(method)
        return DualExpertDiT(**backbone).add_detail_expert(dcm.boundary_timestep, dcm.detail)

    def reseed(self, seed: int, step: int, phase: str, sample_ids: list[int]) -> None:
        super().reseed(seed, step, phase, sample_ids)
        self.step = step
        if phase == "generator":
            self.consistency_target.fold(self.generator, step)  # the previous step's update

    def detail_stage(self, step: int) -> bool:
        """Whether `step` trains the detail expert (the discriminator's phase runs only then)."""
        return self.cfg.mode == "fine" or (self.cfg.mode == "both" and step >= self.cfg.semantic_steps)

    def train_expert(self, expert: str) -> None:
        """Gradients for one expert's parameters only: the detail expert's LoRA and copies, or all the others."""
        for name, p in self.generator.named_parameters():
            p.requires_grad_(is_detail(name) == (expert == "detail"))

    def export_parts(self, weights: dict[str, torch.Tensor]) -> dict:
        """The weights of an expert that did not train (outside the EMA: mode=semantic / fine), and the detail
        LoRA as a peft adapter file (adapter_model.safetensors beside model.safetensors)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        parts = {}
        if any(not p.requires_grad for p in self.generator.parameters()) and self.cfg.mode != "both":
            whole = get_model_state_dict(self.generator, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            parts["weights"] = {k: v for k, v in whole.items() if k not in weights}  # rank 0; {} elsewhere
            weights = weights | parts["weights"]
        if weights:
            parts.update(adapter_parts(weights, self.cfg.detail))
        return parts

    # ---------------------------------------------------------------- pieces
    @property
    def features_net(self) -> WanDiT:
        return self.real_score if isinstance(self.real_score, WanDiT) else self.feature_net

    def clean_clips(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """Clean latents [B, F, C, H, W] (float32) of the batch's clips and their captions."""
        clips = self.batch_latents(batch)
        if clips.shape[1] != self.cfg.num_training_frames:
            raise ValueError(f"clips have {clips.shape[1]} latent frames, expected method.num_training_frames="
                             f"{self.cfg.num_training_frames}")
        return clips.float(), batch["prompts"]

    def teacher_flow(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v_u + w (v_c - v_u) with w = 1 + guidance_scale; guidance_scale 0 skips the unconditional call."""
        v_c = self.real_score(x, t, context).float()
        g = self.cfg.guidance_scale
        if g == 0:
            return v_c
        v_u = self.real_score(x, t, self.negative(x.shape[0])).float()
        return v_u + (1 + g) * (v_c - v_u)

    @property
    def target_net(self) -> nn.Module:
        """θ⁻: the generator itself (target_decay 0; called without gradient) or its EMA copy."""
        target = self.consistency_target
        return self.generator if target.net is None else target

    def causal(self, frames: int):
        """The block pattern for a block-causal student, None for a bidirectional one (one block)."""
        return self.pattern if len(chunk_starts(self.pattern, frames)) > 1 else None

    def jumps(self, batch: dict, expert: str, grad: bool) -> dict:
        """One expert's jump to its phase end from noised clean clips, and the consistency target.

        Every block of a clip is at its own grid point (one block: one point per clip); the teacher, the
        target θ⁻ and the student see the clip with per-frame timesteps. Returns pred x̂_e (with grad when `grad`),
        target x_e, the phase ends e and s_e [B, F], and the text context."""
        clips, prompts = self.clean_clips(batch)
        context = self.encode(prompts)
        b, f = clips.shape[:2]
        lo, hi = self.ranges[expert]
        j = self.block_step_index(b, f, lo + 1, hi + 1)  # [B, F] grid points in (lo, hi]
        e = phase_end(j, self.edges[expert])
        sig = self.sigmas.to(self.device)
        s, s_prev, s_e = sig[j], sig[j - 1], sig[e]
        col = lambda v: v.float()[:, :, None, None, None]  # noqa: E731  [B, F] -> broadcast over [B, F, C, H, W]
        time = lambda v: (1000.0 * v).float()  # noqa: E731
        x_t = (1 - col(s)) * clips + col(s) * self.rng.randn_like(clips)
        causal = self.causal(f)
        with torch.no_grad():
            x_prev = x_t + col(s_prev - s) * self.teacher_flow(x_t, time(s), context)  # the teacher's Euler step
            v_target = self.target_net(x_prev, time(s_prev), context, causal=causal, expert=expert).float()
            target = x_prev + col(s_e - s_prev) * v_target
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            v = self.generator(x_t, time(s), context, causal=causal, expert=expert).float()
            pred = x_t + col(s_e - s) * v
        return {"pred": pred, "target": target, "e": e, "s_e": s_e, "context": context}

    def adversarial(self, out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's and the target's jumps re-noised alike to a level above the phase end, s_a at a grid
        point in [e, e + k) (the reference's range, below pure noise): (fake, real, timesteps [B, F])."""
        pred, e, s_e = out["pred"], out["e"], out["s_e"]
        n, k = self.cfg.euler_steps, self.cfg.split
        j_adv = (e + self.block_step_index(pred.shape[0], pred.shape[1], 0, k)).clamp(max=n - 1)
        s_adv = self.sigmas.to(self.device)[j_adv]
        col = lambda v: v.float()[:, :, None, None, None]  # noqa: E731
        noise = self.rng.randn_like(pred)
        fake = renoise(pred, noise, col(s_e), col(s_adv))
        real = renoise(out["target"], noise, col(s_e), col(s_adv))
        return fake, real, (1000.0 * s_adv).float()

    def features(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        net = self.features_net
        return net(x, t, context, features=feature_blocks(self.cfg.gan, len(net.blocks)))

    # ---------------------------------------------------------------- losses
    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        expert = "detail" if self.detail_stage(self.step) else "semantic"
        self.train_expert(expert)
        out = self.jumps(batch, expert, grad=True)
        pred, target = out["pred"], out["target"]
        consistency = pseudo_huber(pred, target, cfg.huber_c)
        loss, logs = consistency, {"consistency_loss": consistency.detach(), "detail_stage": float(expert == "detail")}
        if expert == "semantic" and cfg.temporal_weight > 0:
            temporal = temporal_loss(pred, target, cfg.temporal_gap)
            loss = loss + cfg.temporal_weight * temporal
            logs["temporal_loss"] = temporal.detach()
        gan = cfg.gan
        if expert == "detail" and gan.adv_weight > 0:
            fake, real, t_adv = self.adversarial(out)
            fake_features = self.features(fake, t_adv, out["context"])  # gradient through the frozen network
            with torch.no_grad():
                real_features = self.features(real, t_adv, out["context"])
            hinge = hinge_generator_loss(self.discriminator(fake_features))
            matching = feature_matching(fake_features, real_features)
            loss = loss + gan.adv_weight * (gan.hinge_weight * hinge + gan.feature_weight * matching)
            logs.update(gan_generator_loss=hinge.detach(), feature_loss=matching.detach())
        return loss, {"generator_loss": loss.detach(), **logs}

    def discriminator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The head's hinge loss on the teacher's features of the detail expert's and the target's jumps."""
        with torch.no_grad():
            out = self.jumps(batch, "detail", grad=False)
            fake, real, t_adv = self.adversarial(out)
            features = self.features(torch.cat([fake, real]), torch.cat([t_adv, t_adv]),
                                     torch.cat([out["context"], out["context"]]))
        fake_logit, real_logit = self.discriminator(features).chunk(2)
        d_loss = hinge_discriminator_loss(fake_logit, real_logit)
        loss = self.cfg.gan.discriminator_weight * d_loss
        return loss, {"discriminator_loss": loss.detach(), "d_hinge_loss": d_loss.detach(),
                      "d_real_logit": real_logit.detach().mean(), "d_fake_logit": fake_logit.detach().mean()}
