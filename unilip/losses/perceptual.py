"""Perceptual losses: LPIPS (VGG) and the ConvNeXt-S logit loss of the UniLIP recipe.

Both networks are frozen and need pretrained weights that are normally downloaded. Pass
the files explicitly (`vgg_weights`, `weights`); without them the loss still runs, on a
random backbone, and says so loudly: a perceptual loss on random features is not the
recipe's loss.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"perceptual-loss weights '{path}' do not exist")
    from unilip.models.hub import StateDictMismatchError, load_safetensors, load_torch_file

    if path.suffix == ".safetensors":
        return load_safetensors(path, what="perceptual-loss weights")
    state = load_torch_file(path, what="perceptual-loss weights")
    if not isinstance(state, dict):
        what = type(state).__name__
        raise StateDictMismatchError(f"perceptual-loss weights '{path}' hold a {what}, not a state dict")
    return state.get("state_dict", state)  # a training checkpoint's weights, or the state dict itself


def _download(build, option: str):
    """Build a network whose constructor downloads its weights; offline, say which option to set."""
    try:
        return build()
    except Exception as error:
        raise RuntimeError(
            f"could not download perceptual-loss weights ({type(error).__name__}: {error}); "
            f"set {option}=<local weights file>"
        ) from None


def _torchvision_vgg16_cached() -> bool:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    return hub.exists()


class LPIPSLoss(nn.Module):
    """LPIPS distance with a VGG-16 backbone, per image: (B, 3, H, W) x2 in [0, 1] -> (B,).

    Args:
        vgg_weights: torchvision's `vgg16-397923af.pth` (ImageNet VGG-16), or "download" to
            fetch it into the torch hub cache. If None, the cache is used when it has the file;
            otherwise the backbone is random (a warning says so). LPIPS's own linear heads ship
            with the `lpips` package.
    """

    def __init__(self, vgg_weights: str | None = None):
        super().__init__()
        import lpips

        if vgg_weights == "download":
            _download(lambda: __import__("torchvision").models.vgg16(weights="IMAGENET1K_V1"), "loss.lpips_vgg_weights")
            vgg_weights = None
        use_cache = vgg_weights is None and _torchvision_vgg16_cached()
        state = _load_weights_file(vgg_weights) if vgg_weights is not None else None  # a bad file: before building
        self.net = lpips.LPIPS(net="vgg", pnet_rand=not use_cache, verbose=False)
        if state is not None:
            self._load_vgg(state, vgg_weights)
        elif not use_cache:
            log.warning(
                "LPIPS: no VGG-16 weights (set loss.lpips_vgg_weights=<vgg16-397923af.pth>); using a RANDOM "
                "backbone: this is not the LPIPS of the recipe"
            )
        self.pretrained = vgg_weights is not None or use_cache
        self.requires_grad_(False).eval()

    def _load_vgg(self, state: dict[str, torch.Tensor], path: str) -> None:
        # lpips splits torchvision's `features.N` layers into slice1..slice5, keeping the indices.
        from unilip.models.hub import StateDictMismatchError, load_strict

        names = {key: "features.{}.{}".format(*re.fullmatch(r"slice\d\.(\d+)\.(\w+)", key).groups())
                 for key in self.net.net.state_dict()}  # fmt: skip
        missing = sorted(set(names.values()) - set(state))
        if missing:
            raise StateDictMismatchError(
                f"perceptual-loss weights '{path}' lack {len(missing)} of VGG-16's tensors ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); give torchvision's vgg16-397923af.pth"
            )
        mapped = {key: state[name] for key, name in names.items()}
        load_strict(self.net.net, mapped, what=f"perceptual-loss weights '{path}' (torchvision VGG-16)")

    def train(self, mode: bool = True) -> LPIPSLoss:
        return super().train(False)  # always frozen, dropout off

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return self.net(reconstructions, images, normalize=True).flatten()


class ConvNeXtLogitLoss(nn.Module):
    """MSE between ConvNeXt-S ImageNet logits of image and reconstruction: (B, 3, H, W) x2 in [0, 1] -> (B,).

    Args:
        weights: a timm `convnext_small` state dict (.safetensors or .pth), or "download" for
            timm's pretrained weights from the hub. If None the network is random and a
            warning says so.
        model_name: the timm model.
        input_size: images are resized to this side before the network (224, its training size).
    """

    def __init__(self, weights: str | None = None, model_name: str = "convnext_small", input_size: int = 224):
        super().__init__()
        import timm

        state = _load_weights_file(weights) if weights not in (None, "download") else None  # a bad file: first
        if weights == "download":
            self.net = _download(lambda: timm.create_model(model_name, pretrained=True), "loss.convnext_weights")
        else:
            self.net = timm.create_model(model_name, pretrained=False)
        if state is not None:
            from unilip.models.hub import load_strict

            load_strict(self.net, state, what=f"perceptual-loss weights '{weights}' (timm {model_name})")
        elif weights is None:
            log.warning(
                "ConvNeXt logit loss: no weights (set loss.convnext_weights=<%s weights>); using a RANDOM "
                "network: this is not the loss of the recipe",
                model_name,
            )
        self.pretrained = weights is not None
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ConvNeXtLogitLoss:
        return super().train(False)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        return self.net((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._logits(images)
        return (self._logits(reconstructions) - target).float().square().mean(dim=1)
