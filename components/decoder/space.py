"""Where the decoder denoises: pixels (the smallest debug preset) or the latents of a frozen `AutoencoderKL`.

Both map images in [-1, 1] to the diffusion space and back. The VAE is always frozen (docs/design.md §4); latents
are scaled by the VAE's `scaling_factor` (SD 0.18215, SDXL 0.13025) so the UNet sees unit-variance inputs.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from components.decoder.unet import check_diffusers_folder


class PixelSpace(nn.Module):
    """Identity: the UNet denoises the image itself."""

    channels = 3
    factor = 1

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images

    def decode(self, z: Tensor) -> Tensor:
        return z


class LatentSpace(nn.Module):
    """A frozen `AutoencoderKL`: from a local diffusers folder (the SD / SDXL `vae/`) or from config kwargs.

    Args:
        pretrained: local diffusers VAE folder; a missing config or weights file is named in the error.
        config: `AutoencoderKL` kwargs: the architecture when `pretrained` is None (tests, meta-device builds,
            a debug VAE you trained yourself); ignored when `pretrained` is given.
        sample: encode with a draw from the posterior (diffusers' training scripts) rather than its mean.
    """

    def __init__(self, pretrained: str | None = None, config: dict[str, Any] | None = None,
                 sample: bool = True) -> None:
        super().__init__()
        if pretrained is None and config is None:
            raise ValueError("LatentSpace needs `pretrained` (a local diffusers VAE folder) or `config`")
        if pretrained is not None:
            self.vae = AutoencoderKL.from_pretrained(check_diffusers_folder(pretrained, "VAE"))
        else:
            self.vae = AutoencoderKL(**config)
        self.vae.requires_grad_(False).eval()
        self.sample = sample
        self.channels = self.vae.config.latent_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale = self.vae.config.scaling_factor

    def train(self, mode: bool = True) -> LatentSpace:
        return super().train(False)  # frozen: never dropout / norm updates

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B,3,H,W) in [-1,1] → (B,C,H/f,W/f) scaled latents."""
        dist = self.vae.encode(images).latent_dist
        return (dist.sample(generator) if self.sample else dist.mean) * self.scale

    def decode(self, z: Tensor) -> Tensor:
        """(B,C,h,w) scaled latents → (B,3,h·f,w·f) in about [-1,1]."""
        return self.vae.decode(z / self.scale).sample
