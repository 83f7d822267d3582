"""The Wan VAE decoder's fast layers (model/wan/vae.py swaps them in, one speed lever each): same
parameters and feature cache as diffusers' layers they replace, the same numbers up to bf16 rounding."""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float) -> torch.Tensor:
    """WanRMS_norm (channels first, float32 normalisation) followed by SiLU, as diffusers computes them."""
    normalized = torch.nn.functional.normalize(x.float(), dim=1).to(x.dtype)
    return torch.nn.functional.silu(normalized * scale * gamma + bias)


# dynamic: one kernel for every channel count and resolution of the decoder (compiled at the first call)
_compiled_rms_norm_silu = torch.compile(rms_norm_silu, fullgraph=True, dynamic=True)


class RMSNormSiLU(WanRMS_norm):
    """A residual block's WanRMS_norm with the block's SiLU folded in (set_fused_norms); no new parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_rms_norm_silu(x, self.gamma, self.bias, self.scale)


def bias_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float, conv_bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(WanRMS_norm(x + conv_bias)) with channels last: x [B, T, H, W, C] is the previous conv's output
    without its bias (or the block's input, conv_bias None). The bias add rounds to x's dtype, as the
    convolution's own bias add does, and the norm is diffusers' (float32 normalisation)."""
    if conv_bias is not None:
        x = (x.float() + conv_bias.float()).to(x.dtype)
    y = torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
    return torch.nn.functional.silu(y * scale * gamma + bias)


def bias_residual(x: torch.Tensor, conv_bias: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """(x + conv_bias) + shortcut, each sum rounded to x's dtype as the two eager adds are."""
    return ((x.float() + conv_bias.float()).to(x.dtype).float() + shortcut.float()).to(x.dtype)


def bias_norm_silu_into(out: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, bias, scale: float,
                        conv_bias: torch.Tensor | None) -> None:
    """bias_norm_silu written into `out` (a slice of the next convolution's input), not a new tensor."""
    out.copy_(bias_norm_silu(x, gamma, bias, scale, conv_bias))


# Static shapes: one graph per channel count, resolution and frame count the decoder feeds them (about
# 20 each). With symbolic shapes inductor cannot size the norm's reduction over channels and emits a
# looped two-pass kernel, much slower than the one-pass kernels it emits here (docs/performance.md).
_compiled_bias_norm_silu = torch.compile(bias_norm_silu, fullgraph=True, dynamic=False)
# compiled, the copy is the norm kernel's own store: the normed frames are written once, in place
_compiled_bias_norm_silu_into = torch.compile(bias_norm_silu_into, fullgraph=True, dynamic=False)
_compiled_bias_residual = torch.compile(bias_residual, fullgraph=True, dynamic=False)


def _channels_last_view(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)  # [B, C, T, H, W] -> [B, T, H, W, C]: a view, contiguous if x is channels-last


def _channels_first_view(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)


class FusedResidualBlock(WanResidualBlock):
    """WanResidualBlock for the streaming decoder (set_fused_blocks): same parameters, same feature-cache
    frames, same sums up to bf16 rounding. Each conv's bias goes into the compiled kernel after it (the
    next norm, or the residual add) instead of a pass of its own; the causal conv's input is one buffer
    [zero frames, cached frames, SiLU(norm(x))] along T with channels last, into which the norm kernel
    stores its frames (no concatenation copy), padded spatially by the convolution; and each tensor is
    let go as soon as it is used, so that at full resolution only the block's input, one conv input,
    its output and the new cache are alive."""

    def forward(self, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006 (diffusers' signature)
        # x: [B, C, T, H, W]; inside, [B, T, H, W, C] views (contiguous when x is channels-last)
        convs = (self.conv1, self.conv2)
        if feat_cache is None or any(type(c) not in (WanCausalConv3d, ImplicitPadCausalConv3d) for c in convs):
            return WanResidualBlock.forward(self, x, feat_cache, feat_idx)
        shortcut = _channels_last_view(self.conv_shortcut(x))
        h, bias = _channels_last_view(x), None
        del x
        for norm, conv in zip((self.norm1, self.norm2), convs):
            idx = feat_idx[0]
            feat_idx[0] += 1
            norm_bias = norm.bias.view(-1) if isinstance(norm.bias, torch.Tensor) else norm.bias
            cache = None if feat_cache[idx] is None else _channels_last_view(feat_cache[idx])
            cached = 0 if cache is None else cache.shape[1]
            steps, time_pad, weight = h.shape[1], conv._padding[4] - cached, conv.weight
            if time_pad > 0 and steps == 1:
                # One output frame whose first time_pad taps read zero frames (the clip's first latent
                # frame, or its second before time upsampling): those taps add exact zeros, so convolve
                # the frames there are with the other taps (a third of the work at the first frame).
                time_pad, weight = 0, _trimmed_weight(conv, time_pad)
            time_pad = max(time_pad, 0)
            if time_pad + cached == 0:
                frames = _compiled_bias_norm_silu(h, norm.gamma.view(-1), norm_bias, norm.scale, bias)
            else:  # [zero frames, cached frames, SiLU(norm(h))], the normed frames stored there directly
                frames = h.new_empty((h.shape[0], time_pad + cached + steps, *h.shape[2:]))
                if time_pad:
                    frames[:, :time_pad].zero_()
                if cached:
                    frames[:, time_pad : time_pad + cached].copy_(cache)
                _compiled_bias_norm_silu_into(frames[:, time_pad + cached :], h, norm.gamma.view(-1), norm_bias,
                                              norm.scale, bias)
            del h, cache
            # the last two frames of [cache, SiLU(norm(h))], as diffusers keeps them
            new_cache = frames[:, -min(2, cached + steps) :].clone()
            feat_cache[idx] = _channels_first_view(new_cache)  # the entry's usual [B, C, T, H, W], channels-last
            del new_cache
            h = _channels_last_view(torch.nn.functional.conv3d(
                _channels_first_view(frames), weight, None, conv.stride, (0, conv._padding[2], conv._padding[0])))
            del frames
            bias = conv.bias
        return _channels_first_view(_compiled_bias_residual(h, bias, shortcut))


def _trimmed_weight(conv: torch.nn.Conv3d, skip: int) -> torch.Tensor:
    """conv's weight without its first `skip` time taps, in the weight's memory layout; cached on the
    conv per (skip, weight version, layout), so it is re-made only when the weight changes."""
    weight = conv.weight
    key = (skip, weight.data_ptr(), weight._version, weight.is_contiguous(memory_format=torch.channels_last_3d))
    cached = getattr(conv, "_trimmed", None)
    if cached is None or cached[0] != key:
        layout = torch.channels_last_3d if key[3] else torch.contiguous_format
        cached = (key, weight.detach()[:, :, skip:].contiguous(memory_format=layout))
        conv._trimmed = cached
    return cached[1]


class NearestUpsample(WanUpsample):
    """WanUpsample without its float32 round trip: nearest upsampling copies values, so upsampling in
    bf16 gives the same numbers with a third of the memory traffic (and no float32 copy at full resolution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                                               recompute_scale_factor=self.recompute_scale_factor)


def upsample_frames(x: torch.Tensor, pairs: bool) -> torch.Tensor:
    """[B, C', T, H, W] (any layout) -> [B * T', 2H, 2W, C] contiguous: nearest 2x spatial upsampling of every
    frame, channels last. pairs: x is a time conv's output whose channels hold two frames each, [k * C + c]
    being channel c of output frame 2t + k (WanResample's reshape + stack, T' = 2T); else C = C', T' = T."""
    b, _, t, h, w = x.shape
    frames = x.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C']
    if pairs:
        frames = frames.unflatten(-1, (2, -1)).permute(0, 1, 4, 2, 3, 5).flatten(1, 2)  # [B, 2T, H, W, C]
    c = frames.shape[-1]
    up = frames.unsqueeze(3).unsqueeze(5).expand(b, frames.shape[1], h, 2, w, 2, c)
    return up.reshape(b * frames.shape[1], 2 * h, 2 * w, c)


# one gather kernel per shape (three in the decoder), where eager would copy for the reshape, the stack,
# the layout and the upsampling in turn
_compiled_upsample_frames = torch.compile(upsample_frames, fullgraph=True, dynamic=False)


class FusedResample(WanResample):
    """WanResample's upsample2d / upsample3d for the decoder (set_fused_upsample): same parameters, same
    feature cache, same numbers. The time conv's frame pairs, the frames' nearest 2x upsampling and the
    channels-last layout the 2-D conv wants come out of one compiled gather (upsample_frames) instead of
    four copies (WanResample reshapes, stacks and permutes into channels-first frames, which the
    upsampling then reads in the slow NCHW kernel)."""

    def forward(self, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006 (diffusers' signature)
        # x: [B, C, T, H, W] -> [B, C_out, T' (2T after a time conv), 2H, 2W], channels-last
        if self.mode not in ("upsample2d", "upsample3d") or feat_cache is None:
            return WanResample.forward(self, x, feat_cache, feat_idx)
        pairs = False
        if self.mode == "upsample3d":  # WanResample's cache logic
            idx = feat_idx[0]
            feat_idx[0] += 1
            cached = feat_cache[idx]
            if cached is None:  # the clip's first latent frame: no time conv, one frame stays one
                feat_cache[idx] = "Rep"
            else:
                rep = isinstance(cached, str)
                cache_x = x[:, :, -2:].clone()
                if cache_x.shape[2] < 2:
                    last = torch.zeros_like(cache_x) if rep else cached[:, :, -1:].to(cache_x.device)
                    cache_x = torch.cat([last, cache_x], dim=2)
                x = self.time_conv(x) if rep else self.time_conv(x, cached)
                feat_cache[idx] = cache_x
                pairs = True
        conv = self.resample[1]
        b = x.shape[0]
        frames = _compiled_upsample_frames(x, pairs).permute(0, 3, 1, 2)  # [B * T', C, 2H, 2W] channels-last
        out = torch.nn.functional.conv2d(frames, conv.weight, conv.bias, conv.stride, conv.padding)
        return out.unflatten(0, (b, -1)).transpose(1, 2)


def _causal_time_pad(x: torch.Tensor, cache_x: torch.Tensor | None, t_pad: int) -> torch.Tensor:
    """[cache_x, x] along T, zero frames in front for what the cache lacks of t_pad: WanCausalConv3d's time padding."""
    if cache_x is not None and t_pad > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        t_pad -= cache_x.shape[2]
    if t_pad > 0:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, t_pad, 0))
    return x


class ImplicitPadCausalConv3d(WanCausalConv3d):
    """WanCausalConv3d with the spatial zero padding done by the convolution itself (set_implicit_padding):
    only the causal time padding (the cached frames, or zeros at the start) is written out."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C_out, T', H', W']
        x = _causal_time_pad(x, cache_x, self._padding[4])
        return torch.nn.functional.conv3d(x, self.weight, self.bias, self.stride, (0, self._padding[2], self._padding[0]),
                                          self.dilation, self.groups)


class StackedCausalConv3d(WanCausalConv3d):
    """WanCausalConv3d computed as one 2-D convolution: output frame t reads input frames t .. t+k_t-1,
    stacked along channels, against the k_t temporal slices of the weight laid side by side. Same sum,
    other kernel; no new parameters (weight2d is a re-laid copy of weight)."""

    def stack_weight(self) -> None:
        out_c, in_c, kt, kh, kw = self.weight.shape
        w = self.weight.detach().permute(0, 2, 1, 3, 4).reshape(out_c, kt * in_c, kh, kw)
        self.weight2d = w.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C_out, T - k_t + 1 + causal padding, H, W]
        x = _causal_time_pad(x, cache_x, self._padding[4])
        batch, kt = x.shape[0], self.kernel_size[0]
        t_out = x.shape[2] - kt + 1
        frames = x.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]: a view when x is channels-last
        stacked = torch.cat([frames[:, k : k + t_out] for k in range(kt)], dim=-1)  # [B, T', H, W, kt*C]
        out = torch.nn.functional.conv2d(stacked.flatten(0, 1).permute(0, 3, 1, 2), self.weight2d, self.bias,
                                         padding=(self._padding[2], self._padding[0]))
        return out.unflatten(0, (batch, t_out)).transpose(1, 2)
