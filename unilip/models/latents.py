"""The latent spaces the DiT generates in: UniLIP's (stages 2 and 3) and the DC-AE's (stage 1).

Both map (B, 3, H, W) images in [0, 1] to (B, 32, h, w) latents already multiplied by their scale
factor (what the DiT sees), and back. The DiT's grid for an output of side S is ceil(S / 28) in both:
16 x 16 for 448 px, decoded at 32 x 16 = 512 px and resized to 448, as the UniLIP reference decodes.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from torch import nn

from unilip.models.generator import DiTPreset, _seeded, load_diffusers_model
from unilip.models.tokenizer import UniLIPTokenizer

log = logging.getLogger(__name__)

PIXELS_PER_LATENT = 28  # UniLIP: ViT patch 14 x pixel shuffle 2; the output size a latent stands for


class UniLIPLatents(nn.Module):
    """UniLIP tokenizer latents x `scale` (10.6 for UniLIP-1B, 9.5 for UniLIP-3B: unit-ish variance for the DiT)."""

    kind = "unilip"

    def __init__(self, tokenizer: UniLIPTokenizer, scale: float):
        super().__init__()
        self.tokenizer, self.scale = tokenizer, scale
        self.requires_grad_(False).eval()

    @property
    def channels(self) -> int:
        return self.tokenizer.config.latent_channels

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 28 -> (B, 32, H/28, W/28) scaled latents."""
        return self.tokenizer.encode(images) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, 32, h, w) scaled latents -> (B, 3, *size) images, nominally [0, 1] (not clamped)."""
        return self.tokenizer.decode(latents / self.scale, size=size)


class DCAELatents(nn.Module):
    """DC-AE latents x its `scaling_factor`: the space the pretrained SANA DiT knows (stage 1 trains there)."""

    kind = "dcae"

    def __init__(self, autoencoder: AutoencoderDC):
        super().__init__()
        self.autoencoder = autoencoder
        self.scale = float(autoencoder.config.scaling_factor)
        self.requires_grad_(False).eval()

    @property
    def channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 32 -> (B, 32, H/32, W/32) scaled latents."""
        return self.autoencoder.encode(images * 2 - 1).latent * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, 32, h, w) scaled latents -> (B, 3, *size) images (decoded at 32 h x 32 w, resized), nominally [0, 1]."""
        decoded = self.autoencoder.decode(latents / self.scale).sample
        decoded = F.interpolate(decoded, size=tuple(size), mode="bilinear", align_corners=False)
        return (decoded + 1) / 2


def latent_grid(size: int) -> int:
    """The DiT's latent side for an output of `size` pixels (448 -> 16)."""
    return math.ceil(size / PIXELS_PER_LATENT)


def build_dcae(preset: DiTPreset) -> AutoencoderDC:
    """The DC-AE of `preset` (stage 1's latent space): random with `preset.seed` or pretrained."""
    if preset.dcae_weights is None:
        if preset.dcae is None:
            raise ValueError("the dit preset names no DC-AE (dit.dcae or dit.dcae_weights); stage 1 needs one")
        return _seeded(lambda: AutoencoderDC(**preset.dcae), preset.seed + 1)
    return load_diffusers_model(AutoencoderDC, preset.dcae_weights, "vae", "dit.dcae_weights", preset.dcae)


def latent_scale(tokenizer: UniLIPTokenizer, override: float | None, source: str, tolerance: float = 0.1) -> float:
    """The factor on the tokenizer's latents: `override` if given, else the one its record holds.

    A tokenizer trained here has its own latent statistics: the released weights' 10.6 / 9.5 would
    give the DiT latents of the wrong variance, so an unmeasured tokenizer is an error, and an
    override more than `tolerance` away from the recorded value is logged as a warning.
    """
    recorded = tokenizer.config.latent_scale
    if override is None:
        if recorded is None:
            raise ValueError(
                f"the tokenizer {source} records no latent scale; measure it with `python -m "
                f"unilip.evaluation.latent_stats {source} <shards> --write`, or set latent_scale=<factor>"
            )
        return float(recorded)
    if recorded is not None and abs(override / recorded - 1) > tolerance:
        log.warning(
            "latent_scale=%s overrides the tokenizer's measured %s (%.0f%% apart): the DiT's latents will not "
            "have unit variance",
            override,
            recorded,
            100 * abs(override / recorded - 1),
        )
    return float(override)
