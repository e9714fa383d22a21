"""The Reconstruct tab's computation: one image through one tokenizer, exactly as `eval.py` evaluates it.

The image is prepared as the evaluation loader prepares it (decoded as a viewer shows it, shorter edge resized to
the size, centre crop), reconstructed with the evaluation protocol (`unilip.evaluation.protocols.reconstruct`: 256
px is reflect-padded to 280 and cropped back, `protocol_resize` chooses how the decoder output shrinks), and
measured with eval.py's metrics (PSNR, SSIM, feature cosine to the original encoder). Metrics are computed on the
float reconstruction, as eval.py does; the page shows it rounded to 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unilip.data.transforms import crop_box, decode_image, render, to_float
from unilip.errors import UserError, one_line
from unilip.evaluation.metrics import feature_similarity, psnr, ssim
from unilip.evaluation.protocols import RESIZES, reconstruct
from unilip.models.tokenizer import FrozenEncoder, UniLIPTokenizer

# What the page offers: the tokenizer's native sizes and the paper's 256 px protocol.
SIZES = {"224": 224, "448": 448, "256 (protocol)": 256}
HEAT_SCALE = 0.25  # mean absolute error (images in [0, 1]) at which the heat map saturates


@dataclass
class EvaluatedTokenizer:
    """A tokenizer as eval.py sets it up: padding on (the 256 px protocol), its original encoder if known."""

    tokenizer: UniLIPTokenizer
    teacher: FrozenEncoder | None
    notes: list[str]  # where the teacher came from, or why feature cosine is not measured
    source: str


def load_evaluated_tokenizer(path: Path, preset: str | None, device: str) -> EvaluatedTokenizer:
    """A run folder, checkpoint, saved tokenizer or released `.pth` (with `preset`), and its teacher, through
    eval.py's own loading (`load_evaluated`, `resolve_teacher`)."""
    from omegaconf import OmegaConf

    from unilip.evaluation.run import load_evaluated, resolve_teacher

    evaluated = load_evaluated(str(path), preset)
    tokenizer = evaluated.tokenizer.eval()
    tokenizer.config.pad_to_multiple = True  # as eval.py: the 256 px protocol pads to 280 and crops back
    notes: list[str] = []
    try:
        teacher = resolve_teacher(OmegaConf.create({"preset": preset, "teacher": None}), evaluated, notes)
    except (UserError, OSError) as error:  # eval.py stops here; the page still shows the reconstruction
        teacher = None
        notes.append(f"feature fidelity not measured: the original encoder could not be read ({one_line(error)})")
    tokenizer.to(device)
    if teacher is not None:
        teacher.to(device)
    return EvaluatedTokenizer(tokenizer, teacher, notes, evaluated.source)


def read_upload(path: str | Path) -> bytes:
    """An uploaded file's bytes; a missing upload is the user's to fix."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"the upload could not be read ({error.strerror}); upload the image again") from None


def evaluation_input(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> (size, size, 3) uint8, as the evaluation loader makes it (`SampleTransform`, train=False)."""
    try:
        image = decode_image(data, size)
        image.load()
    except (ValueError, OSError) as error:
        raise ValueError(f"the image could not be read: {error}. Upload a JPEG, PNG or WebP image") from None
    return render(image, crop_box(*image.size, size, None), size, flip=False)


def heat_map(images: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) pair in [0, 1] -> (H, W, 3) uint8: the mean absolute error per pixel, black (0) through
    red and yellow to white (`HEAT_SCALE` and above)."""
    error = (images - reconstructions).abs().mean(dim=1)[0].clamp(0, HEAT_SCALE) / HEAT_SCALE
    anchors = torch.tensor([[0, 0, 0], [120, 0, 0], [230, 60, 0], [255, 200, 0], [255, 255, 255]], dtype=torch.float)
    position = error.cpu().float() * (len(anchors) - 1)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    weight = (position - low)[..., None]
    colours = anchors[low] * (1 - weight) + anchors[low + 1] * weight
    return colours.round().to(torch.uint8).numpy()


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded (as the generate CLI writes images)."""
    return (images[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


@dataclass
class Reconstruction:
    reconstruction: np.ndarray  # (H, W, 3) uint8
    difference: np.ndarray  # (H, W, 3) uint8 heat map
    psnr: float
    ssim: float
    feature_cosine: float | None  # None: no original encoder known

    def metrics_markdown(self, notes: list[str]) -> str:
        cosine = "not measured" if self.feature_cosine is None else f"{self.feature_cosine:.4f}"
        lines = [
            "| metric | value |",
            "|---|---|",
            f"| PSNR (dB) | {self.psnr:.2f} |",
            f"| SSIM | {self.ssim:.4f} |",
            f"| feature cosine to the original encoder | {cosine} |",
        ]
        return "\n".join(lines + [""] + [f"- {note}" for note in notes])


@torch.no_grad()
def reconstruct_pixels(model: EvaluatedTokenizer, pixels: np.ndarray, resize: str = "project") -> Reconstruction:
    """(S, S, 3) uint8 -> reconstruction, heat map and eval.py's per-image metrics."""
    if resize not in RESIZES:
        raise ValueError(f"protocol_resize={resize!r}: use one of {RESIZES}")
    device = next(model.tokenizer.parameters()).device
    images = to_float(torch.from_numpy(pixels).permute(2, 0, 1)[None]).to(device)
    out = reconstruct(model.tokenizer, images, resize)
    recon = out.images.float().clamp(0, 1)
    cosine = None
    if model.teacher is not None:
        cosine = float(feature_similarity(out.features, model.teacher.features(images))[0][0])
    return Reconstruction(
        to_pixels(recon), heat_map(images, recon), float(psnr(images, recon)[0]), float(ssim(images, recon)[0]), cosine
    )
