"""The tokenizer objective of the UniLIP recipe (REFERENCE section 2).

    L = 1.0 * L2(x, x^) + 1.1 * (1.0 * LPIPS + 0.1 * ConvNeXt-S logit MSE)
        + distill * MSE(student features, teacher features)            (stage 2)
        + 0.1 * hinge G loss                                            (after the GAN start)
    D: hinge loss + 0.001 * LeCam                                       (after the GAN start)

Every weight is a constructor argument; every term comes back already weighted, under the
name it is logged with. A term whose weight is 0 is neither built nor computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unilip.losses.adversarial import hinge_d_loss, hinge_g_loss
from unilip.losses.perceptual import ConvNeXtLogitLoss, LPIPSLoss


class TokenizerLoss(nn.Module):
    """Reconstruction, perceptual, distillation and adversarial terms. Images are (B, 3, H, W) in [0, 1]."""

    def __init__(
        self,
        l2_weight: float = 1.0,
        l1_weight: float = 0.0,
        perceptual_weight: float = 1.1,
        lpips_weight: float = 1.0,
        convnext_weight: float = 0.1,
        distill_weight: float = 0.0,
        gan_weight: float = 0.1,
        lecam_weight: float = 0.001,
        lpips_vgg_weights: str | None = None,
        convnext_weights: str | None = None,
    ):
        super().__init__()
        self.l2_weight, self.l1_weight = l2_weight, l1_weight
        self.lpips_weight = perceptual_weight * lpips_weight
        self.convnext_weight = perceptual_weight * convnext_weight
        self.distill_weight = distill_weight
        self.gan_weight, self.lecam_weight = gan_weight, lecam_weight
        self.lpips = LPIPSLoss(lpips_vgg_weights) if self.lpips_weight > 0 else None
        self.convnext = ConvNeXtLogitLoss(convnext_weights) if self.convnext_weight > 0 else None

    def reconstruction(self, images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {}
        if self.l2_weight:
            terms["l2"] = self.l2_weight * F.mse_loss(reconstructions.float(), images.float())
        if self.l1_weight:
            terms["l1"] = self.l1_weight * F.l1_loss(reconstructions.float(), images.float())
        if self.lpips is not None:
            terms["lpips"] = self.lpips_weight * self.lpips(images, reconstructions).float().mean()
        if self.convnext is not None:
            terms["convnext"] = self.convnext_weight * self.convnext(images, reconstructions).mean()
        return terms

    def distillation(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """L2 self-distillation between (B, N, D) post-projector features."""
        if not self.distill_weight:
            return {}
        return {"distill": self.distill_weight * F.mse_loss(student.float(), teacher.float())}

    def generator_adversarial(self, logits_fake: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"gan_g": self.gan_weight * hinge_g_loss(logits_fake.float())}

    def discriminator(
        self, logits_real: torch.Tensor, logits_fake: torch.Tensor, lecam: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        terms = {"gan_d": hinge_d_loss(logits_real.float(), logits_fake.float())}
        if lecam is not None and self.lecam_weight:
            terms["lecam"] = self.lecam_weight * lecam
        return terms
