"""The toy world's VAE: pixels are the latents."""

import torch


class IdentityVAE(torch.nn.Module):
    """Same interface as the Wan VAE wrapper, on [B, F, C, H, W], with no compression at all."""

    temporal_compression = 1
    spatial_compression = 1

    def __init__(self, latent_channels: int = 3):
        super().__init__()
        self.latent_channels = latent_channels

    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.ndim != 5 or x.shape[2] != self.latent_channels:
            raise ValueError(f"{what} must be [B, F, {self.latent_channels}, H, W], "
                             f"got {tuple(x.shape)}")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._check(video, "video")
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # A student may overshoot the pixel range; the decoded video is a picture, so clamp.
        self._check(latents, "latents")
        return latents.clamp(-1.0, 1.0)

    def stream_decoder(self, batch_size: int) -> "IdentityStreamDecoder":
        """Chunk-by-chunk decoding with the Wan VAE's interface (nothing to carry between chunks)."""
        return IdentityStreamDecoder(self)


class IdentityStreamDecoder:
    def __init__(self, vae: IdentityVAE):
        self.vae, self.frames_decoded = vae, 0

    def decode(self, chunk: torch.Tensor) -> torch.Tensor:
        self.frames_decoded += chunk.shape[1]
        return self.vae.decode(chunk)

    def reset(self) -> None:
        self.frames_decoded = 0
