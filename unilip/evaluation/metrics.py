"""Per-image reconstruction and feature-fidelity metrics, and the optional networks behind them.

Images are (B, 3, H, W) in [0, 1]. Every per-image function returns (B,).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from unilip.errors import UnreadableFileError
from unilip.models.hub import load_torch_file

log = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; it is reported as this cap


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1), capped at 100 dB for identical images."""
    values = peak_signal_noise_ratio(
        reconstructions.float(), images.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return values.nan_to_num(posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)


SSIM_BORDER = 5  # (11 - 1) / 2: where the 11x11 window does not fit inside the image


def ssim(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03, data range 1), averaged over channels.

    The SSIM map is averaged over the valid region only (a 5 px border excluded), as in Wang et
    al.'s reference code and scikit-image. torchmetrics' own reduction averages the whole
    reflect-padded map instead, which reads about 0.005 to 0.01 lower on 100-300 px images.
    """
    _, full = structural_similarity_index_measure(
        reconstructions.float(), images.float(), data_range=1.0, reduction="none", return_full_image=True
    )
    valid = full[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]
    return valid.mean(dim=(1, 2, 3))


def feature_similarity(features: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) features vs reference -> per-image (cosine averaged over tokens, MSE)."""
    cosine = F.cosine_similarity(features.float(), reference.float(), dim=-1).mean(dim=-1)
    mse = (features.float() - reference.float()).square().mean(dim=(1, 2))
    return cosine, mse


def build_fid(inception_weights: str | None) -> nn.Module | None:
    """torchmetrics' FID on Inception-V3 pool features, or None without weights (the caller notes it). It takes
    uint8 images (`normalize=False`): the evaluation quantises them itself (`unilip.evaluation.quantize`).

    The weights file (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`) is read here with
    `weights_only=True` (a truncated or foreign file is an `UnreadableFileError` naming it); torch-fidelity
    then reads a copy we wrote, never the user's file itself (it unpickles without restriction).
    """
    if inception_weights is None:
        return None
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = Path(inception_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"inception_weights={path} does not exist")
    state = load_torch_file(path, what="inception_weights")
    with tempfile.TemporaryDirectory() as tmp:
        checked = Path(tmp) / "inception.pth"
        torch.save(state, checked)
        return FrechetInceptionDistance(feature=2048, normalize=False, feature_extractor_weights_path=str(checked))


class ExternalFeatures(nn.Module):
    """An external vision encoder (any transformers image model directory: CLIP, SigLIP, DINOv2, ...).

    Measures, as UAE's Unified-Bench does with its external encoders, how similar the
    reconstruction looks to the original through another model's eyes: per-image cosine of
    pooled embeddings. Normalisation and input size come from the model's image processor config.
    """

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        config = AutoConfig.from_pretrained(path)
        self.model, info = AutoModel.from_pretrained(
            path, config=getattr(config, "vision_config", config), output_loading_info=True
        )
        if info["missing_keys"]:  # a set in transformers 5
            missing = sorted(info["missing_keys"])
            raise UnreadableFileError(
                f"external_features={path}: the checkpoint lacks {len(missing)} weights its config asks for"
                f" (first: {', '.join(missing[:5])}); point it at a complete transformers image model directory"
            )
        processor = AutoImageProcessor.from_pretrained(path)
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        side = size.get("height") or size.get("shortest_edge")
        self.size = int(side)
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        images = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", antialias=True)
        out = self.model(pixel_values=(images.clamp(0, 1) - self.mean) / self.std)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(self.embed(images), self.embed(reconstructions), dim=-1)
