"""Wan's VAE: diffusers' AutoencoderKLWan on [B, F, C, H, W], normalised latents, streaming decode.

Latents are normalised per channel as Wan and Self-Forcing do, `(mu - mean) * (1 / std)` with the
posterior mean (no sampling), and un-normalised as diffusers' WanPipeline does before decoding,
`z / (1 / std) + mean`.

Streaming: `AutoencoderKLWan._decode` decodes one latent frame at a time through causal convs that
keep their last input frames in a feature cache (`feat_cache` / `feat_idx`), and its public
`decode()` clears that cache on every call. `WanStreamDecoder` runs the same per-frame loop but
keeps its own cache across calls, so a causal generator's chunks can be decoded as they come out,
and the concatenated chunks equal the whole-clip decode exactly.
"""

from __future__ import annotations

import inspect

import diffusers
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
    unpatchify,
)
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .folder import check_wan_folder
from .text_encoder import to_dtype
from .vae_layers import (
    FusedResample,
    FusedResidualBlock,
    ImplicitPadCausalConv3d,
    NearestUpsample,
    RMSNormSiLU,
    StackedCausalConv3d,
)
from .weights import raise_on_mismatch

# The streaming decoder drives AutoencoderKLWan's private per-frame loop (`clear_cache`,
# `_feat_map`, `decoder(x, feat_cache=, feat_idx=, first_chunk=)`, `post_quant_conv`). `first_chunk`
# arrived with Wan2.2 support in 0.35; 0.42 is the newest version it was checked against. Widen the
# range only after tests/test_wan_parts.py passes on the new version.
DIFFUSERS_SUPPORTED = ">=0.35,<0.43"


def check_diffusers_version(version: str | None = None) -> None:
    version = version or diffusers.__version__
    if not SpecifierSet(DIFFUSERS_SUPPORTED).contains(Version(version), prereleases=True):
        raise RuntimeError(
            f"WanVAE's streaming decoder relies on AutoencoderKLWan internals of diffusers "
            f"{DIFFUSERS_SUPPORTED}, but diffusers {version} is installed; install a version in that "
            f"range (pip install 'diffusers{DIFFUSERS_SUPPORTED}') or re-check model/wan/vae.py against it"
        )


def check_decoder_internals(vae: AutoencoderKLWan) -> None:
    """Fail at construction, not mid-rollout, if the private API the streaming decoder uses changed."""
    problems = [f"AutoencoderKLWan.{a}" for a in ("clear_cache", "post_quant_conv", "decoder") if not hasattr(vae, a)]
    if not problems:
        vae.clear_cache()
        if not isinstance(getattr(vae, "_feat_map", None), list):
            problems.append("AutoencoderKLWan._feat_map (a list, set by clear_cache)")
        params = inspect.signature(vae.decoder.forward).parameters
        problems += [f"WanDecoder3d.forward({p}=)" for p in ("feat_cache", "feat_idx", "first_chunk") if p not in params]
    if problems:
        raise RuntimeError(
            f"diffusers {diffusers.__version__}'s AutoencoderKLWan lacks what WanVAE's streaming decoder "
            f"uses: {', '.join(problems)}; install diffusers{DIFFUSERS_SUPPORTED}"
        )


class WanVAE(torch.nn.Module):
    """encode(video [B, F, 3, H, W] in [-1, 1]) -> latents [B, f, z_dim, h, w] float32, f = 1 + (F-1)/4;
    decode(latents) -> video [B, F, 3, H, W] float32 in [-1, 1]; stream_decoder(batch) for chunks."""

    def __init__(self, path: str, dtype="bfloat16", device=None):
        super().__init__()
        check_diffusers_version()
        folder = check_wan_folder(path, parts=("vae",))
        vae, info = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=to_dtype(dtype), output_loading_info=True)
        on_meta = {name for name, t in vae.state_dict().items() if t.is_meta}
        raise_on_mismatch(
            sorted(set(info["missing_keys"]) | on_meta), sorted(info["unexpected_keys"]),
            sorted(str(m) for m in info["mismatched_keys"]), f"{folder / 'vae'} does not match AutoencoderKLWan",
        )
        check_decoder_internals(vae)
        for module in vae.modules():  # exact: nearest upsampling copies values, in any dtype
            if type(module) is WanUpsample and module.mode in ("nearest", "nearest-exact"):
                module.__class__ = NearestUpsample
        self.model = vae.requires_grad_(False).eval()
        self.channels_last = False  # set_channels_last
        self.fused_norms = False  # set_fused_norms
        self.stacked_convs = False  # set_stacked_convs
        self.implicit_padding = False  # set_implicit_padding
        self.fused_blocks = False  # set_fused_blocks
        self.fused_upsample = False  # set_fused_upsample
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        # Derived from the architecture (one 2x step per down block, patchify on top), so a Wan2.2
        # VAE or any other config gets the right numbers; the config's own factors must agree.
        self.temporal_compression = 2 ** sum(cfg.temperal_downsample)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        for key, derived in (("scale_factor_temporal", self.temporal_compression),
                             ("scale_factor_spatial", self.spatial_compression)):
            if cfg.get(key) is not None and cfg.get(key) != derived:
                raise ValueError(f"{folder / 'vae'}/config.json says {key}={cfg.get(key)} but its layers give {derived}")
        self.pixel_channels = cfg.in_channels // (cfg.patch_size or 1) ** 2  # Wan2.2 patchifies pixels
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"{folder / 'vae'}/config.json: latents_mean / latents_std need z_dim={cfg.z_dim} entries")
        # [1, 1, C, 1, 1]: broadcast over [B, F, C, H, W]; not persistent, they come from the config.
        shape = (1, 1, cfg.z_dim, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape), persistent=False)
        if device is not None:
            self.to(device)

    def set_channels_last(self, enabled: bool) -> None:
        """Store conv weights channels-last (NDHWC / NHWC) and feed the decoder channels-last activations:
        cuDNN's fast 3-D convolution kernels on recent GPUs work in that layout. Same numbers, other layout."""
        fmt = {5: torch.channels_last_3d, 4: torch.channels_last} if enabled else {5: torch.contiguous_format, 4: torch.contiguous_format}
        with torch.no_grad():
            for p in self.model.parameters():
                if p.ndim in fmt:
                    p.data = p.data.contiguous(memory_format=fmt[p.ndim])
        self.channels_last = bool(enabled)

    def set_fused_norms(self, enabled: bool) -> None:
        """Run each residual block's RMS norm and the SiLU after it, and the encoder's and decoder's output
        norm and SiLU, as one torch.compile'd function (the norm upcasts to float32 and makes five passes
        over full-resolution activations)."""
        if enabled:  # one graph per layout the decoder feeds it (channels-last or not, 1 or 4 frames, cache or not)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # the heads: norm_out then nonlinearity, which their forward uses nowhere else
        for block in (self.model.encoder, self.model.decoder):
            if enabled and not isinstance(block.norm_out, RMSNormSiLU):
                block.silu, block.nonlinearity = block.nonlinearity, torch.nn.Identity()
                block.norm_out.__class__ = RMSNormSiLU
            elif not enabled and isinstance(block.norm_out, RMSNormSiLU):
                block.nonlinearity = block.silu
                block.norm_out.__class__ = WanRMS_norm
        for block in self.model.modules():
            if isinstance(block, WanResidualBlock):
                if enabled and not isinstance(block.norm1, RMSNormSiLU):
                    block.silu = block.nonlinearity
                    block.nonlinearity = torch.nn.Identity()  # now inside the norms
                    block.norm1.__class__ = block.norm2.__class__ = RMSNormSiLU
                elif not enabled and isinstance(block.norm1, RMSNormSiLU):
                    block.nonlinearity = block.silu
                    block.norm1.__class__ = block.norm2.__class__ = WanRMS_norm
        self.fused_norms = bool(enabled)

    def set_stacked_convs(self, enabled: bool) -> None:
        """Compute the decoder's causal k_t x k x k convolutions as 2-D convolutions over the k_t input
        frames stacked in channels (one GEMM per output frame batch, the 2-D kernels cuDNN tunes best)."""
        for conv in self.model.decoder.modules():
            if isinstance(conv, WanCausalConv3d) and conv.kernel_size[0] > 1:
                if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1:
                    raise ValueError(f"stacked convolutions need stride, dilation and groups 1, got {conv}")
                if enabled:
                    conv.__class__ = StackedCausalConv3d
                    conv.stack_weight()
                else:
                    conv.__class__ = WanCausalConv3d
                    conv.weight2d = None
        self.stacked_convs = bool(enabled)

    def set_implicit_padding(self, enabled: bool) -> None:
        """Let the convolution pad the decoder's causal 3-D convolutions spatially (cuDNN reads zeros at
        the border) instead of writing a zero-padded copy of every input first; same sum. The fused
        residual blocks (set_fused_blocks) always pad this way; this covers the decoder's other convs."""
        _swap_class(self.model.decoder, WanCausalConv3d, ImplicitPadCausalConv3d, enabled)
        self.implicit_padding = bool(enabled)

    def set_fused_blocks(self, enabled: bool) -> None:
        """Run each decoder residual block as its two convolutions between compiled kernels (conv bias +
        RMS norm + SiLU, conv bias + residual add), with spatial padding left to the convolution and
        every intermediate freed as soon as it is used (FusedResidualBlock)."""
        if enabled:  # one graph per layout, channel count and cache state the decoder feeds it
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _swap_class(self.model.decoder, WanResidualBlock, FusedResidualBlock, enabled)
        self.fused_blocks = bool(enabled)

    def set_fused_upsample(self, enabled: bool) -> None:
        """Run the decoder's spatial upsampling layers as FusedResample: the time conv's frame pairs, the
        nearest 2x upsampling and the 2-D conv's channels-last input from one compiled gather."""
        for module in self.model.decoder.modules():
            if type(module) in (WanResample, FusedResample) and module.mode in ("upsample2d", "upsample3d"):
                up, conv = module.resample
                if not isinstance(up, WanUpsample) or up.scale_factor not in ((2.0, 2.0), 2.0) or \
                        up.mode not in ("nearest", "nearest-exact") or conv.stride != (1, 1) or conv.groups != 1:
                    raise ValueError(f"the fused upsampling needs nearest 2x upsampling and a plain conv, got {module.resample}")
        _swap_class(self.model.decoder, WanResample, FusedResample, enabled)
        self.fused_upsample = bool(enabled)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[2] != channels:
            raise ValueError(f"{what} must be [B, F, {channels}, H, W], got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        # video: [B, F, C, H, W] pixels in [-1, 1]
        self._check(video, self.pixel_channels, "video")
        frames, height, width = video.shape[1], video.shape[3], video.shape[4]
        t, s = self.temporal_compression, self.spatial_compression
        if (frames - 1) % t or height % s or width % s:
            raise ValueError(f"video must have 1 + {t}k frames and H, W divisible by {s}, got F={frames}, {height}x{width}")
        posterior = self.model.encode(video.to(self.dtype).transpose(1, 2)).latent_dist
        mu = posterior.mode().transpose(1, 2).float()  # the mean, not a sample: deterministic latents
        return (mu - self.mean) * self.inv_std

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        # [B, f, c, h, w] normalised -> [B, c, f, h, w] in the VAE's dtype
        self._check(latents, self.latent_channels, "latents")
        return (latents.float() / self.inv_std + self.mean).to(self.dtype).transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole clip at once, through diffusers' public decode (clamped to [-1, 1] there)."""
        return self.model.decode(self._denormalise(latents)).sample.transpose(1, 2).float()

    def stream_decoder(self, batch_size: int) -> "WanStreamDecoder":
        return WanStreamDecoder(self, batch_size)


def _swap_class(root: torch.nn.Module, plain: type, fast: type, enabled: bool) -> None:
    """Every module of exactly class `plain` under root becomes `fast` (enabled) or back: same parameters."""
    old, new = (plain, fast) if enabled else (fast, plain)
    for module in root.modules():
        if type(module) is old:
            module.__class__ = new


class WanStreamDecoder:
    """Decodes one clip chunk by chunk; concatenating the outputs equals `WanVAE.decode` of the clip.

    The first latent frame gives 1 pixel frame, every later one `temporal_compression` frames. The
    feature cache lives here, not on the VAE, so several streams and whole-clip decodes can interleave.
    """

    def __init__(self, vae: WanVAE, batch_size: int):
        self.vae, self.batch_size = vae, batch_size
        self.reset()

    def reset(self) -> None:
        """Start a new clip."""
        self.vae.model.clear_cache()
        self.feat_cache = [None] * len(self.vae.model._feat_map)
        self.frames_decoded = 0  # latent frames consumed so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # latents: [B, f, c, h, w], the next f latent frames of the clip -> pixels [B, F', C, H, W]
        if latents.shape[0] != self.batch_size or latents.shape[1] == 0:
            raise ValueError(f"expected a chunk [B={self.batch_size}, f>=1, c, h, w], got {tuple(latents.shape)}")
        model = self.vae.model
        # The post-quant conv is 1x1x1, so running it per chunk gives what diffusers' whole-clip pass gives.
        x = model.post_quant_conv(self.vae._denormalise(latents))
        if self.vae.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = []
        for i in range(x.shape[2]):  # the loop of AutoencoderKLWan._decode, one latent frame per call
            first = self.frames_decoded == 0
            out.append(model.decoder(x[:, :, i : i + 1], feat_cache=self.feat_cache, feat_idx=[0], first_chunk=first))
            self.frames_decoded += 1
        video = torch.cat(out, dim=2)
        if model.config.patch_size is not None:  # Wan2.2's VAE, as in _decode
            video = unpatchify(video, patch_size=model.config.patch_size)
        return video.clamp(-1.0, 1.0).transpose(1, 2).float()
