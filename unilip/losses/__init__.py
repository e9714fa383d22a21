"""Losses of the UniLIP tokenizer recipe; each returns named, weighted terms (the names that get logged).

May import `unilip.models` (the strict loading of perceptual networks' weights) and the foundation.
"""

from unilip.losses.adversarial import LeCamRegularizer, hinge_d_loss, hinge_g_loss
from unilip.losses.perceptual import ConvNeXtLogitLoss, LPIPSLoss
from unilip.losses.tokenizer import TokenizerLoss

__all__ = ["ConvNeXtLogitLoss", "LPIPSLoss", "LeCamRegularizer", "TokenizerLoss", "hinge_d_loss", "hinge_g_loss"]
