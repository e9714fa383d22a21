"""How the decoded image is brought back to the input size: the project's way, or the reference's exactly.

The UniLIP reference evaluates 256 px with `DC_AE_ViT_Stage2_Pad` (tokenizer/modeling/dc_ae_vit_stage2_pad.py):
reflect-pad to the next multiple of 28 (280), encode, decode at 32 x the latent (320), shrink to
round(h * 28 / 32) x round(w * 28 / 32) (280) bilinearly with `align_corners=True`, crop the padding away.
The project resizes with `align_corners=False` (as the reference's own 224 / 448 models do), which differs
by about 2 % of the reconstruction's magnitude at 256 px. Inputs that need no padding are resized the
project's way under both settings, as the reference's 224 / 448 evaluation models do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unilip.models.tokenizer import TokenizerOutput, UniLIPTokenizer

RESIZES = ("project", "reference")


def reconstruct(tokenizer: UniLIPTokenizer, images: torch.Tensor, resize: str = "project") -> TokenizerOutput:
    """(B, 3, H, W) in [0, 1] -> reconstruction, features and latent, resized as `resize` says."""
    if resize not in RESIZES:
        raise ValueError(f"protocol_resize={resize!r}: use one of {RESIZES}")
    multiple = tokenizer.config.input_multiple
    height, width = images.shape[-2:]
    if resize == "project" or (height % multiple == 0 and width % multiple == 0):
        return tokenizer.reconstruct(images)
    pad_h, pad_w = -height % multiple, -width % multiple
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(images, (left, pad_w - left, top, pad_h - top), mode="reflect")
    features = tokenizer.features(padded)
    latent = tokenizer.latent_from_features(features, (padded.shape[-2] // multiple, padded.shape[-1] // multiple))
    decoded = tokenizer.decoder(latent.to(tokenizer.decoder.conv_in.weight.dtype))
    ratio = multiple / tokenizer.config.decoder_factor  # 28 / 32
    size = (round(decoded.shape[-2] * ratio), round(decoded.shape[-1] * ratio))
    decoded = F.interpolate(decoded, size=size, mode="bilinear", align_corners=True)
    cropped = decoded[..., top : top + height, left : left + width]
    return TokenizerOutput((cropped + 1) / 2, features, latent)
