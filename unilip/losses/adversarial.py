"""Hinge GAN losses and LeCam regularisation (Tseng et al., CVPR 2021), as in the UniLIP recipe."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(x))))."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(D(G(x)))."""
    return -logits_fake.mean()


class LeCamRegularizer(nn.Module):
    """LeCam regulariser: pulls D's outputs towards EMAs of its outputs on the other class.

    R = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(x)))^2). The EMAs are
    buffers (saved with the model, so resume is exact) and are averaged over ranks before
    each update, so every rank holds the same values.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold this step's mean logits into the EMAs; `keep` (a 0/1 tensor) = 0 leaves them unchanged."""
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)  # SUM, then divide: gloo has no AVG
            means /= dist.get_world_size()
        # the first update copies (decay 0), so the EMAs do not start from an arbitrary zero
        decay = torch.where(self.initialised, self.decay, 0.0)
        new_real = decay * self.ema_real + (1 - decay) * means[0]
        new_fake = decay * self.ema_fake + (1 - decay) * means[1]
        if keep is not None:  # a skipped (non-finite) step must not poison the EMAs
            use = keep > 0
            new_real, new_fake = torch.where(use, new_real, self.ema_real), torch.where(use, new_fake, self.ema_fake)
            self.initialised.logical_or_(use)
        else:
            self.initialised.fill_(True)
        self.ema_real.copy_(new_real)
        self.ema_fake.copy_(new_fake)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return F.relu(logits_real - self.ema_fake).square().mean() + F.relu(self.ema_real - logits_fake).square().mean()
