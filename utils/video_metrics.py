"""Scores of generated clips without ground truth: CLIP text-video score, frame-to-frame CLIP consistency,
flicker, PSNR / LPIPS against a reference clip, and the per-frame curves of drift past the training length.

Clips are uint8 frames [F, H, W, 3] (what is written to mp4, so a score describes the video a person
watches) or unit-range tensors [F, 3, H, W]. The heavy scorers load from local files only: CLIP from
open-clip (a folder holding open_clip_config.json and its weights, or a weights file with an
architecture name) or from a transformers CLIP folder; LPIPS from the `lpips` package with torchvision's
backbone weights already in torch's hub cache. Nothing is downloaded: what is missing is reported as a
reason, and the caller skips that score.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB for identical clips (MSE 0), so means stay finite and metrics.json stays valid JSON
# CLIP's image normalisation (OpenAI's, which open-clip and transformers use for CLIP weights that name none)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- pixel scores
def unit_frames(clip, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [F, H, W, 3] (numpy or torch) -> float [F, 3, H, W] in [0, 1] on `device`."""
    x = torch.as_tensor(clip)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x.to(device).permute(0, 3, 1, 2).float() / 255


def flicker_by_frame(frames: torch.Tensor) -> torch.Tensor:
    """[F - 1]: mean |x_t - x_(t-1)| of frames [F, C, H, W] in [0, 1], for t = 1 .. F - 1 (0: no change)."""
    if frames.shape[0] < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {frames.shape[0]}")
    return (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))


def consistency_by_frame(features: torch.Tensor) -> torch.Tensor:
    """[F - 1]: cosine similarity of the image features [F, D] of frames t - 1 and t (1: the same picture)."""
    if features.shape[0] < 2:
        raise ValueError(f"consistency needs at least 2 frames, got {features.shape[0]}")
    return F.cosine_similarity(features[1:].double(), features[:-1].double(), dim=-1).float()


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of frames against reference (both in [0, 1], the same shape); PSNR_CAP when identical."""
    if frames.shape != reference.shape:
        raise ValueError(f"PSNR of clips of different shapes: {tuple(frames.shape)} vs {tuple(reference.shape)}")
    mse = (frames.double() - reference.double()).pow(2).mean().item()
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1 / mse))


def sample_indices(num_frames: int, count: int | None) -> list[int]:
    """`count` frame indices spread evenly from the first frame to the last (all when count is None or >= F)."""
    if count is None or count >= num_frames:
        return list(range(num_frames))
    if count < 1:
        raise ValueError(f"frames to sample must be >= 1, got {count}")
    if count == 1:
        return [num_frames // 2]
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


# ---------------------------------------------------------------------------- CLIP
@dataclass
class ClipScorer:
    """L2-normalised CLIP image features of frames and text features of prompts."""

    encode_images: Callable[[torch.Tensor], torch.Tensor]  # normalised pixels [N, 3, S, S] -> [N, D]
    encode_texts: Callable[[list[str]], torch.Tensor]  # prompts -> [P, D]
    image_size: tuple[int, int]
    mean: tuple
    std: tuple
    device: torch.device
    backend: str  # "open_clip" | "transformers"
    source: str  # the weights it was loaded from

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> CLIP's input: the shorter side resized to the image size (bicubic,
        antialiased), a centre crop, CLIP's normalisation. Done in torch on the device instead of PIL, so
        pixels in the last digits differ from open-clip's own transform; scores are compared within one tool."""
        h, w = self.image_size
        scale = max(h / frames.shape[-2], w / frames.shape[-1])
        size = (max(h, round(frames.shape[-2] * scale)), max(w, round(frames.shape[-1] * scale)))
        x = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        x = x[..., top : top + h, left : left + w]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def images(self, frames: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """[N, D] float32 unit vectors of frames [N, 3, H, W] in [0, 1], `batch` frames per forward."""
        out = [self.encode_images(self.preprocess(frames[i : i + batch].to(self.device))).float()
               for i in range(0, frames.shape[0], batch)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.encode_texts(list(prompts)).float(), dim=-1)


OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                     "open_clip_pytorch_model.pth")


def load_clip(weights: str | None, model: str, device: torch.device | str, key: str = "clip.weights") -> ClipScorer:
    """A CLIP scorer from local weights; FileNotFoundError / ValueError / ImportError name `key` and what to pass.

    `weights`: an open-clip folder (open_clip_config.json + open_clip_model.safetensors, as the hub's
    open-clip repos hold them), a transformers CLIP folder (config.json of a CLIPModel), or an open-clip
    weights file of the architecture `model` (e.g. ViT-B-32)."""
    if weights is None:
        raise FileNotFoundError(f"{key} is null; pass the local path of CLIP weights (an open-clip folder or file, "
                                "or a transformers CLIP folder)")
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}={weights} does not exist; pass the local path of CLIP weights (an open-clip "
                                "folder or file, or a transformers CLIP folder)")
    device = torch.device(device)
    if path.is_file():
        return _open_clip(model, str(path), device, key, source=str(path))
    if (path / "open_clip_config.json").is_file():
        if not any((path / name).is_file() for name in OPEN_CLIP_WEIGHTS):
            # open-clip would build the model with random weights and only log a warning
            raise FileNotFoundError(f"{key}={weights} holds open_clip_config.json but none of {list(OPEN_CLIP_WEIGHTS)}")
        return _open_clip(f"local-dir:{path}", None, device, key, source=str(path))
    if (path / "config.json").is_file():
        return _transformers_clip(path, device, key)
    raise ValueError(f"{key}={weights} is neither an open-clip folder (open_clip_config.json + weights), a "
                     "transformers CLIP folder (config.json) nor a weights file")


def _open_clip(name: str, pretrained: str | None, device: torch.device, key: str, source: str) -> ClipScorer:
    try:
        import open_clip
    except Exception as e:  # ImportError, or torchvision built for another torch (a RuntimeError at import)
        raise ImportError(f"{key}={source} needs open-clip, which does not import here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); pip install open_clip_torch with a torchvision matching torch, "
                          "or pass a transformers CLIP folder") from None
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as e:
        raise ValueError(f"{key}={source}: open-clip cannot build {name!r}: {str(e).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)

    def texts(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(device))

    return ClipScorer(model.encode_image, texts, size, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)),
                      device, "open_clip", source)


def _transformers_clip(path: Path, device: torch.device, key: str) -> ClipScorer:
    from transformers import AutoTokenizer, CLIPModel

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise ValueError(f"{key}={path} is a transformers folder of model_type {config.get('model_type')!r}, not 'clip'")
    model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    preprocessor = path / "preprocessor_config.json"
    pre = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}  # absent: CLIP's own statistics
    size = model.config.vision_config.image_size
    max_len = model.config.text_config.max_position_embeddings

    def images(pixels: torch.Tensor) -> torch.Tensor:
        return model.visual_projection(model.vision_model(pixel_values=pixels.to(model.dtype)).pooler_output)

    def texts(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return model.text_projection(pooled)

    return ClipScorer(images, texts, (size, size), tuple(pre.get("image_mean", CLIP_MEAN)),
                      tuple(pre.get("image_std", CLIP_STD)), device, "transformers", str(path))


@dataclass
class ClipScores:
    """One clip's CLIP scores: means and per-frame curves."""

    clip_score: float  # mean cosine of the prompt's text feature and the sampled frames' image features
    consistency: float  # mean cosine of neighbouring frames' image features
    clip_score_by_frame: torch.Tensor  # [F]
    consistency_by_frame: torch.Tensor  # [F - 1]


def clip_scores(scorer: ClipScorer, frames: torch.Tensor, prompt: str, sampled: int | None, batch: int = 64) -> ClipScores:
    """CLIP scores of frames [F, 3, H, W] in [0, 1]: every frame is encoded once (the consistency and the
    per-frame curve need all of them); the text score averages `sampled` evenly spread frames."""
    features = scorer.images(frames, batch)
    text = scorer.texts([prompt])[0]
    by_frame = features @ text
    consistency = consistency_by_frame(features)
    score = by_frame[sample_indices(frames.shape[0], sampled)].mean()
    return ClipScores(score.item(), consistency.mean().item(), by_frame.cpu(), consistency.cpu())


# ---------------------------------------------------------------------------- LPIPS
def load_lpips(net: str, device: torch.device | str):
    """The LPIPS distance (lpips package) with `net`'s torchvision weights from torch's hub cache, or a
    one-line reason it cannot run here (the caller skips it). Nothing is downloaded."""
    try:
        import lpips
        import torchvision.models as tv
    except Exception as e:  # ImportError, or torchvision built for another torch
        return None, f"LPIPS skipped: the lpips package does not import here ({type(e).__name__}: {str(e).splitlines()[0]})"
    weights = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}.get(net)
    if weights is None:
        return None, f"LPIPS skipped: lpips.net={net} is not one of alex, vgg, squeeze"
    url = getattr(tv, weights).IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached.is_file():
        return None, f"LPIPS skipped: torchvision's {net} weights are not at {cached} (put {Path(url).name} there)"
    model = lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def distance(frames: torch.Tensor, reference: torch.Tensor, batch: int = 16) -> float:
        """Mean LPIPS over frames [F, 3, H, W] in [0, 1] against reference."""
        total = 0.0
        for i in range(0, frames.shape[0], batch):
            a, b = frames[i : i + batch].to(device), reference[i : i + batch].to(device)
            total += model(a * 2 - 1, b * 2 - 1).sum().item()
        return total / frames.shape[0]

    return distance, None


# ---------------------------------------------------------------------------- VBench
# The VBench dimensions that score videos of any prompt (its custom_input mode) and the files each loads
# from VBench's cache (vbench/utils.py init_submodules with local=True; VBench would download a missing one).
VBENCH_WEIGHTS = {
    "subject_consistency": ("dino_model/dino_vitbase16_pretrain.pth", "dino_model/facebookresearch_dino_main"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
}


def vbench_dimensions(dimensions: list[str], cache_dir: str | None) -> tuple[list[str], Path | None, list[str]]:
    """(the dimensions that can run here, VBench's cache, one line per dimension or reason that cannot)."""
    if not dimensions:
        return [], None, []
    try:
        import vbench  # noqa: F401
    except Exception as e:  # ImportError, or a dependency built for another torch
        return [], None, [f"VBench skipped: the vbench package does not import here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pip install vbench and put its weights in its cache"]
    cache = Path(cache_dir or os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench").expanduser()
    ready, skipped = [], []
    for dim in dimensions:
        missing = [f for f in VBENCH_WEIGHTS[dim] if not (cache / f).exists()]
        if missing:
            skipped.append(f"VBench {dim} skipped: {cache / missing[0]} is missing (vbench.cache_dir={cache})")
        else:
            ready.append(dim)
    return ready, cache, skipped


def run_vbench(folder: Path, prompts: dict[str, str], dimensions: list[str], cache: Path, out_dir: Path, name: str,
               device: torch.device) -> dict[str, float]:
    """VBench's mean score per dimension over the mp4s in `folder` (`prompts`: file name -> prompt)."""
    import vbench.utils
    from vbench import VBench

    vbench.utils.CACHE_DIR = str(cache)  # read when the dimensions load (init_submodules), not only at import
    out_dir.mkdir(parents=True, exist_ok=True)
    results = VBench(device, str(out_dir / "unused_full_info.json"), str(out_dir)).evaluate(
        videos_path=str(folder), name=name, prompt_list=dict(prompts), dimension_list=list(dimensions), local=True,
        mode="custom_input")
    return {dim: float(results[dim][0]) for dim in dimensions}


# ---------------------------------------------------------------------------- summaries
def mean_curves(curves: list[torch.Tensor]) -> list[float]:
    """Element-wise mean of equal-length per-frame curves, as a JSON-ready list."""
    return torch.stack([c.float().cpu() for c in curves]).mean(0).tolist()
