"""Image KD (WanDistiller-style): a one-frame image student distilled from a frozen video teacher.

The student is `model.wan.transformer.WanImageDiT` (2-D patches, no temporal RoPE axis), its size in
model.backbone. It starts from the teacher's weights, projected (`project_state_dict`): the 3-D patch kernel
folded to 2-D, the teacher blocks of `method.teacher_blocks` (default evenly spaced), and, when narrower, the
"truncate" rule: the teacher's first H' heads of every attention, the first F' hidden units of every
feed-forward and the first D' = H' x head_dim channels of the residual stream (embeddings, modulation, norms,
output head). Head size, channels, text and time widths must equal the teacher's.

The loss, for a one-frame latent x_t = (1 - s) x0 + s eps at timestep t:

    L = || v_student(x_t, t, c) - sg(v_g(x_t, t, c)) ||^2,    v_g = v_c + g (v_c - v_u)   (g = guidance_scale)

with the teacher run at one frame. x0: image latents when the data give them (data=latents, one frame each);
on prompts alone, the student's own sample (kd_input=student: the states inference visits, re-noised to t),
or none (kd_input=noise: x_t is pure noise at every t, WanDistiller's static-prompt input).

ImageKDDMD chains it: `kd_steps` steps of KD, then DMD (model/dmd.py) on the student's few-step one-frame
samples against the teacher and a critic, one run. Images are sampled by `sample_image`, the rollout's step
loop on one frame, in training's DMD stage, validation (engine/validation.py) and inference.py alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.base import MethodConfig, SelfForcingModel
from model.contract import Network, Phase
from model.dmd import DMD
from model.schedule import FlowSchedule
from model.wan.transformer import WanDiT, WanImageDiT
from model.wan.weights import backbone_config, load_strict, read_state_dict
from pipeline.rollout import denoise_steps
from utils.distributed import log0

WIDTH_RULES = ("truncate",)
KD_INPUTS = ("student", "teacher", "noise")


def uniform_steps(n: int) -> list[float]:
    """n timesteps 1000, 1000 - 1000/n, ..., 1000/n: warped, an n-step Euler grid of the shifted schedule."""
    return [1000 - i * 1000 / n for i in range(n)]


# ---------------------------------------------------------------------------- sampling
def sample_image(generator, noise: torch.Tensor, context: torch.Tensor, steps, *, schedule: FlowSchedule, rng,
                 exit_step: int | None = None, with_grad: bool = False) -> torch.Tensor:
    """x0 [B, 1, C, H, W] from noise [B, 1, C, H, W]: the rollout's step loop (pipeline.rollout.denoise_steps) on one
    frame, no KV cache. With renoise="implied" and uniform_steps(n) warped it is n Euler steps of the flow."""

    def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
        timestep = torch.full(x.shape[:2], t, device=x.device, dtype=torch.float32)
        return schedule.x0_from_flow(x, generator(x, timestep, context), t)

    return denoise_steps(denoise, noise, steps, schedule=schedule, rng=rng, exit_step=exit_step, with_grad=with_grad)


@torch.no_grad()
def sample_images(parts, generator, prompts: list[str], rng, noise: torch.Tensor | None = None):
    """(latents [B, 1, C, H, W], pixels [B, 1, C', H', W'] float32 on the CPU in [-1, 1]) of `prompts`.

    parts: a method or an inference Student (model/base.py RolloutParts: encode, steps, schedule, latent_shape; and
    its vae). The noise is drawn from rng as inference draws a one-frame clip's (also when `noise` replaces it), so
    validation images and inference.py's with the same prompts and seeds are the same images."""
    drawn = rng.randn((len(prompts), 1, *parts.latent_shape))
    noise = drawn if noise is None else noise.to(device=drawn.device, dtype=drawn.dtype)
    x0 = sample_image(generator, noise, parts.encode(prompts), parts.steps, schedule=parts.schedule, rng=rng)
    return x0, parts.vae.decode(x0).float().cpu()


def is_image_student(generator) -> bool:
    return isinstance(generator, WanImageDiT)


# ---------------------------------------------------------------------------- weight projection
def fold_patch_embedding(weight: torch.Tensor) -> torch.Tensor:
    """[D, C, k_t, p_h, p_w] -> [D, C, p_h, p_w]: the 3-D kernel summed over its temporal taps. With Wan's k_t = 1
    the 2-D conv equals the 3-D conv on one frame; with k_t > 1, the 3-D conv on the frame repeated k_t times."""
    if weight.ndim != 5:
        raise ValueError(f"expected a 3-D patch kernel [D, C, k_t, p_h, p_w], got shape {tuple(weight.shape)}")
    return weight.sum(dim=2)


def default_blocks(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks, the first and the last included (one block: the first)."""
    if student_layers == 1:
        return [0]
    return [int(i * (teacher_layers - 1) / (student_layers - 1) + 0.5) for i in range(student_layers)]


# What each tensor's dimensions narrow by: "model" (the residual width D), "heads" (the attention channels of the
# kept heads), "ffn" (hidden units), "model6" (the six modulation chunks of D); None: kept whole. Missing
# trailing entries are None.
_AXES = {
    "patch_embedding.weight": ("model",),
    "patch_embedding.bias": ("model",),
    "condition_embedder.time_embedder.linear_1.weight": ("model",),
    "condition_embedder.time_embedder.linear_2.weight": ("model", "model"),
    "condition_embedder.text_embedder.linear_1.weight": ("model",),
    "condition_embedder.text_embedder.linear_2.weight": ("model", "model"),
    "condition_embedder.time_proj.weight": ("model6", "model"),
    "condition_embedder.time_proj.bias": ("model6",),
    "scale_shift_table": (None, None, "model"),
    "proj_out.weight": (None, "model"),
    "proj_out.bias": (),
    **{f"condition_embedder.{e}_embedder.linear_{i}.bias": ("model",) for e in ("time", "text") for i in (1, 2)},
}
_BLOCK_AXES = {
    "scale_shift_table": (None, None, "model"),
    "norm2.weight": ("model",),
    "norm2.bias": ("model",),
    "ffn.net.0.proj.weight": ("ffn", "model"),
    "ffn.net.0.proj.bias": ("ffn",),
    "ffn.net.2.weight": ("model", "ffn"),
    "ffn.net.2.bias": ("model",),
}
for _a in ("attn1", "attn2"):
    _BLOCK_AXES.update({f"{_a}.to_{p}.weight": ("heads", "model") for p in "qkv"})
    _BLOCK_AXES.update({f"{_a}.to_{p}.bias": ("heads",) for p in "qkv"})
    _BLOCK_AXES.update({f"{_a}.norm_{p}.weight": ("heads",) for p in "qk"})
    _BLOCK_AXES.update({f"{_a}.to_out.0.weight": ("model", "heads"), f"{_a}.to_out.0.bias": ("model",)})

# Config keys the student must share with the teacher for the projection to be defined.
_SAME = ("in_channels", "out_channels", "text_dim", "freq_dim", "attention_head_dim", "cross_attn_norm", "qk_norm")


def check_projectable(teacher: dict, student: dict, teacher_blocks: list[int] | None = None) -> list[int]:
    """The teacher blocks the student's blocks start from; a student the projection cannot map is a one-line error."""
    for key in _SAME:
        if teacher[key] != student[key]:
            why = (" (the projection keeps whole heads, and a head's RoPE channel layout depends on its size): "
                   "narrow the student by num_attention_heads instead") if key == "attention_head_dim" else ""
            raise ValueError(f"model.backbone.{key}={student[key]} differs from the teacher's {teacher[key]}; the "
                             f"projection needs the same {key}{why}")
    if list(teacher["patch_size"])[1:] != list(student["patch_size"])[1:]:
        raise ValueError(f"model.backbone.patch_size={list(student['patch_size'])}: the spatial patch must be the "
                         f"teacher's {list(teacher['patch_size'])[1:]}")
    for key, what in (("num_attention_heads", "heads"), ("ffn_dim", "feed-forward units")):
        if student[key] > teacher[key]:
            raise ValueError(f"model.backbone.{key}={student[key]} is wider than the teacher's {teacher[key]}: the "
                             f"projection keeps a subset of the teacher's {what}, so the student cannot be wider")
    layers, depth = student["num_layers"], teacher["num_layers"]
    if layers > depth:
        raise ValueError(f"model.backbone.num_layers={layers} is deeper than the teacher's {depth}: layer "
                         "selection only makes a student shallower")
    if teacher_blocks is None:
        return default_blocks(depth, layers)
    blocks = list(teacher_blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"method.teacher_blocks={blocks}: block {bad[0]} is out of range; the teacher has blocks "
                         f"0..{depth - 1}")
    if len(blocks) != layers or len(set(blocks)) != len(blocks):
        raise ValueError(f"method.teacher_blocks={blocks}: give {layers} distinct teacher blocks, one per student "
                         f"block (model.backbone.num_layers={layers})")
    return blocks


def _indices(teacher: dict, student: dict) -> dict[str, torch.Tensor]:
    """The truncate rule's kept indices of each narrowed dimension."""
    width = teacher["num_attention_heads"] * teacher["attention_head_dim"]
    kept = torch.arange(student["num_attention_heads"] * student["attention_head_dim"])
    return {"model": kept, "heads": kept, "ffn": torch.arange(student["ffn_dim"]),
            "model6": torch.cat([k * width + kept for k in range(6)])}


@torch.no_grad()
def project_state_dict(teacher_state: dict[str, torch.Tensor], teacher: dict, student: dict,
                       teacher_blocks: list[int] | None = None, width_rule: str = "truncate") -> dict[str, torch.Tensor]:
    """The image student's initial weights (diffusers names, the teacher's dtype) from a video teacher's state dict.

    teacher / student: their WanTransformer3DModel configs. Student block i is teacher block teacher_blocks[i]
    (default: evenly spaced); narrower dimensions keep the teacher's first entries (width_rule "truncate")."""
    if width_rule not in WIDTH_RULES:
        raise ValueError(f"method.width_rule={width_rule!r}: expected one of {WIDTH_RULES}")
    blocks = check_projectable(teacher, student, teacher_blocks)
    index = _indices(teacher, student)
    out = {}
    names = [k for k in teacher_state if not k.startswith("blocks.")]
    names += [f"blocks.{i}.{rest}" for i in range(len(blocks)) for rest in _block_names(teacher_state)]
    for name in names:
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        source, axes = (f"blocks.{blocks[int(match.group(1))]}.{match.group(2)}", _BLOCK_AXES.get(match.group(2))) \
            if match else (name, _AXES.get(name))
        if axes is None:
            raise ValueError(f"the teacher's {source} has no projection rule (model/image_kd.py _AXES): a Wan T2V "
                             "transformer is expected")
        value = teacher_state[source]
        value = value[...] if not isinstance(value, torch.Tensor) else value  # a lazily read file tensor
        if name == "patch_embedding.weight":
            value = fold_patch_embedding(value)
        for dim, kind in enumerate(axes):
            if kind is not None:
                value = value.index_select(dim, index[kind].to(value.device))
        out[name] = value.contiguous()
    return out


def _block_names(state: dict) -> list[str]:
    """The per-block tensor names (after `blocks.N.`) of block 0."""
    return [k[len("blocks.0."):] for k in state if k.startswith("blocks.0.")]


@torch.no_grad()
def prediction_error(teacher: torch.nn.Module, student: torch.nn.Module, latent_shape, text_len: int,
                     timesteps=(100.0, 300.0, 500.0, 700.0, 900.0), samples: int = 2, seed: int = 0) -> dict:
    """How much of the teacher's one-frame flow prediction the student keeps: ||v_s - v_t|| / ||v_t|| on random
    latents N(0, I) [samples, 1, C, H, W] and random text contexts N(0, I) [samples, text_len, text_dim], per
    timestep and averaged (0: identical, 1: as far off as predicting zero)."""
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, 1, *latent_shape), generator=gen).to(device)
    context = torch.randn((samples, text_len, teacher.config.text_dim), generator=gen).to(device)
    per_t = {}
    for t in timesteps:
        timestep = torch.full((samples, 1), float(t), device=device)
        want, got = teacher(x, timestep, context).double(), student(x, timestep, context).double()
        per_t[float(t)] = ((got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)).mean().item()
    return {"relative_error": sum(per_t.values()) / len(per_t), "per_timestep": per_t}


# ---------------------------------------------------------------------------- the student's builder
def _backbone(cfg) -> dict:
    """The student's WanTransformer3DModel config: model.backbone, or (a full-size student) the Wan folder's."""
    return backbone_config(OmegaConf.to_container(cfg.model.backbone, resolve=True), cfg.model.path,
                           "the image student's WanTransformer3DModel config")


def _teacher_weights(cfg, built: dict) -> tuple[dict, dict]:
    """(state dict, config) of the Wan teacher: from the built teacher when it holds its weights, else its files."""
    m = cfg.model
    teacher = built.get("teacher")
    if m.teacher is not None or not isinstance(teacher, WanDiT):
        raise ValueError(f"method.project_init=true projects a Wan teacher's weights, but the teacher is "
                         f"{type(teacher).__name__} (model.teacher): set method.project_init=false for a random "
                         "student, or give a Wan teacher (model.teacher_path)")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    if not any(p.is_meta for p in teacher.parameters()):
        return teacher.state_dict(), config
    return read_state_dict(m.teacher_path, lazy=True), config  # sharded loading built it empty: read tensor by tensor


def build_image_student(cfg, built: dict) -> WanImageDiT:
    """The generator: a WanImageDiT of model.backbone from model.generator_init (an image student's weights, or a
    video DiT's of the student's size, its patch kernel folded), the projected teacher (method.project_init), or
    random weights."""
    m, method = cfg.model, cfg.method
    student = WanImageDiT(**_backbone(cfg))
    if m.generator_init is not None:
        if method.project_init:
            raise ValueError(f"model.generator_init={m.generator_init} and method.project_init=true both say where "
                             "the image student starts: set method.project_init=false to load generator_init, or "
                             "model.generator_init=null to project the teacher")
        state = read_state_dict(m.generator_init)
        if state.get("patch_embedding.weight", torch.empty(0)).ndim == 5:  # a video DiT's: of the student's size, strictly
            state["patch_embedding.weight"] = fold_patch_embedding(state["patch_embedding.weight"])
            log0("image student: %s holds a video DiT's weights; its patch kernel folded to 2-D", m.generator_init)
        load_strict(student, state, str(m.generator_init))
    elif method.project_init:
        state, config = _teacher_weights(cfg, built)
        blocks = None if method.teacher_blocks is None else list(method.teacher_blocks)
        projected = project_state_dict(state, config, dict(student.config), blocks, method.width_rule)
        load_strict(student, {k: v.float() for k, v in projected.items()}, "the projected teacher")
        log0("image student: %d blocks from teacher blocks %s, %d of %d heads (%s)", student.config.num_layers,
             check_projectable(config, dict(student.config), blocks), student.config.num_attention_heads,
             config["num_attention_heads"], method.width_rule)
    return student


# ---------------------------------------------------------------------------- the methods
@dataclass
class ImageKDConfig(MethodConfig):
    # the student samples like the teacher it mimics: 50 deterministic Euler steps of the shifted schedule
    denoising_step_list: list[float] = field(default_factory=lambda: uniform_steps(50))
    renoise: str = "implied"
    max_step_ratio: float = 1.0  # KD timesteps up to 1000: the sampler's first step
    num_frame_per_block: int = 1  # one frame: one block
    num_training_frames: int = 1
    project_init: bool = True  # with model.generator_init null: start from the projected teacher (false: random)
    teacher_blocks: list[int] | None = None  # the teacher block of each student block, distinct (null: evenly spaced)
    width_rule: str = "truncate"  # a narrower student keeps the teacher's first heads, units and channels
    kd_input: str = "student"  # x0 on prompts alone: the student's own sample | noise: x_t is pure noise
    kd_sample_steps: int = 4  # Euler steps of that sample (kd_input=student)

    def __post_init__(self):
        for key in ("num_training_frames", "min_num_frames", "max_num_frames"):
            value = getattr(self, key)
            if value is not None and value != 1:
                raise ValueError(f"method.{key}={value}: an image student makes one frame; set it to 1")
        if self.num_frame_per_block != 1 or self.independent_first_frame:
            raise ValueError(f"method.num_frame_per_block={self.num_frame_per_block}: an image student makes one "
                             "frame, one block; set it to 1 (and independent_first_frame=false)")
        super().__post_init__()
        if self.width_rule not in WIDTH_RULES:
            raise ValueError(f"method.width_rule={self.width_rule!r}: expected one of {WIDTH_RULES}")
        if self.kd_input not in KD_INPUTS:
            raise ValueError(f"method.kd_input={self.kd_input!r}: expected one of {KD_INPUTS}")
        if self.kd_sample_steps < 1:
            raise ValueError(f"method.kd_sample_steps must be >= 1, got {self.kd_sample_steps}")


@dataclass
class ImageKDDMDConfig(ImageKDConfig):
    kd_steps: int = 1000  # steps of KD; DMD (generator and critic phases) from then on

    def __post_init__(self):
        super().__post_init__()
        if self.kd_steps < 0:
            raise ValueError(f"method.kd_steps must be >= 0, got {self.kd_steps}")


class ImageKD(DMD):
    """KD of the image student on the teacher's one-frame flow; no critic."""

    config_class = ImageKDConfig
    cfg: ImageKDConfig
    networks = {
        **{k: v for k, v in SelfForcingModel.networks.items() if k in ("text_encoder", "vae", "teacher")},
        "generator": Network("generator", build=build_image_student, trained=True, ema=True),
    }
    # prompts (a static prompt file, the toy world's) or, without them, one-frame image latents (data=latents)
    phases = (Phase("kd", "kd_loss", ("generator",), data=("prompts|videos",)),)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the student's own samples for kd_input=student: deterministic Euler, as it is sampled after KD
        self.kd_schedule = FlowSchedule(self.cfg.timestep_shift, renoise="implied")
        self.kd_steps = self.kd_schedule.denoising_steps(uniform_steps(self.cfg.kd_sample_steps), warp=True)

    @classmethod
    def inference_generator(cls, backbone: dict, method: dict) -> WanImageDiT:
        return WanImageDiT(**backbone)

    def teacher_flow(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The teacher's flow at one frame with CFG v_c + g (v_c - v_u) (g = guidance_scale; 0: no uncond call)."""
        flow = self.real_score(x_t, t, context)
        g = self.cfg.guidance_scale
        if g == 0:
            return flow
        return flow + g * (flow - self.real_score(x_t, t, self.negative(x_t.shape[0])))

    def kd_clean(self, batch: dict, context: torch.Tensor) -> torch.Tensor | None:
        """x0 [B, 1, C, H, W] of the KD input: the batch's image latents, the student's sample, or None (pure noise)."""
        expected = (1, *self.latent_shape)
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
        elif "video" in batch:  # pixels (the toy world's images)
            with torch.no_grad():
                latents = self.vae.encode(batch["video"].to(self.device))
        elif self.cfg.kd_input == "noise":
            return None
        else:  # the student's or the teacher's own sample
            net = self.generator if self.cfg.kd_input == "student" else self.teacher_flow
            noise = self.rng.randn((context.shape[0], *expected))
            with torch.no_grad():
                return sample_image(net, noise, context, self.kd_steps, schedule=self.kd_schedule, rng=self.rng)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"image latents of shape {tuple(latents.shape[1:])}, expected [1, C, H, W] = {list(expected)} "
                             "(one frame of model.latent_shape)")
        return latents

    def kd_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        context = self.encode(batch["prompts"])
        x0 = self.kd_clean(batch, context)
        b = context.shape[0]
        t = self.score_timestep(b, 1, None)  # [B, 1]: uniform, shifted, clamped to [min, max]_step_ratio
        noise = self.rng.randn((b, 1, *self.latent_shape))
        x_t = noise if x0 is None else self.schedule.add_noise(x0, noise, t)
        with torch.no_grad():
            target = self.teacher_flow(x_t, t, context)
        flow = self.generator(x_t, t, context)
        loss = F.mse_loss(flow.float(), target.float())
        return loss, {"kd_loss": loss.detach(), "kd_timestep": t.mean().detach()}


class ImageKDDMD(ImageKD):
    """kd_steps of KD, then DMD on the student's own one-frame samples (a critic, the teacher's CFG score)."""

    config_class = ImageKDDMDConfig
    cfg: ImageKDDMDConfig
    networks = {**ImageKD.networks, "critic": Network("fake_score", build="critic", trained=True)}
    phases = (
        Phase("kd", "kd_loss", ("generator",), data=("prompts|videos",), when="kd_stage"),
        Phase("generator", "generator_loss", ("generator",), every="dfake_gen_update_ratio", when="dmd_stage"),
        Phase("critic", "critic_loss", ("critic",), when="dmd_stage"),
    )

    def kd_stage(self, step: int) -> bool:
        return step < self.cfg.kd_steps

    def dmd_stage(self, step: int) -> bool:
        return step >= self.cfg.kd_steps

    def generate(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """The student's one-frame sample through the step list, exiting at a drawn step with grad (DMD's input)."""
        context = self.encode(batch["prompts"])
        _, exits = self.plan_rollout()
        noise = self.rng.randn((context.shape[0], 1, *self.latent_shape))
        x0 = sample_image(self.generator, noise, context, self.steps, schedule=self.schedule, rng=self.rng,
                          exit_step=exits[0], with_grad=True)
        return x0, torch.ones(1, dtype=torch.bool), self.denoised_range(exits)
