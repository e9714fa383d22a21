"""How alike two images are to a vision encoder: the reconstruction similarity of UAE's Unified-Bench and
the reward of the unified loop ("Can Understanding and Generation Truly Benefit Together?", Yan et al. 2025).

Each encoder maps an image to one pooled feature vector, as its model family defines it in transformers:

    clip                 CLIPVisionModelWithProjection  image_embeds   (= CLIPModel.get_image_features)
    clip_vision_model    CLIPVisionModel                pooler_output  (no projection in the checkpoint)
    siglip, siglip_vision_model  SiglipVisionModel      pooler_output  (= SiglipModel.get_image_features)
    dinov2               Dinov2Model                    pooler_output  (the layer-normed CLS token)
    dinov3_vit           DINOv3ViTModel                 pooler_output  (the layer-normed CLS token)

and the similarity of a source image and its regeneration is the cosine of the two vectors. Images are
prepared on the device the encoder runs on, as the checkpoint's own `preprocessor_config.json` says (resize:
the shorter edge or to a fixed size, center crop, mean / std), from (B, 3, H, W) tensors in [0, 1].

Weights come from a hub id or a local directory (`weights`), every tensor of the model read from it
(a missing one is an error, never a random init); without `weights` an encoder is built with random weights
drawn from `seed` (`model_type` + `config`: tests and the toy quick start, where a fixed random encoder is a
reward the tiny models can move).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unilip.models.hub import StateDictMismatchError, read_json, resolve_pretrained

log = logging.getLogger(__name__)

# model_type -> (transformers class, output attribute holding the pooled features)
FAMILIES: dict[str, tuple[str, str]] = {
    "clip": ("CLIPVisionModelWithProjection", "image_embeds"),
    "clip_vision_model": ("CLIPVisionModel", "pooler_output"),
    "siglip": ("SiglipVisionModel", "pooler_output"),
    "siglip_vision_model": ("SiglipVisionModel", "pooler_output"),
    "dinov2": ("Dinov2Model", "pooler_output"),
    "dinov3_vit": ("DINOv3ViTModel", "pooler_output"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbering, as processor configs store it


@dataclass
class EncoderSpec:
    """One vision encoder of the similarity; presets in `conf/reward/`.

    Attributes:
        name: how its scores are named (`clip`, `dinov2`, ...).
        weights: hub id or directory of a transformers checkpoint (its config.json, weights and
            preprocessor_config.json); None: random weights (`model_type`, `config`, `seed`).
        weight: its weight in the training reward (Unified-Bench reports every encoder and their plain mean).
        model_type, config: the transformers model type and config keyword arguments of a random encoder.
        image_size, mean, std: how a random encoder's input is prepared (square resize, normalisation).
        seed: the random encoder's weights are drawn from it.
    """

    name: str
    weights: str | None = None
    weight: float = 1.0
    model_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    seed: int = 0

    def __post_init__(self) -> None:
        self.config = dict(self.config or {})
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preprocess:
    """How an encoder's checkpoint prepares an image (from its preprocessor_config.json)."""

    size: tuple[int, int] | None  # resize to (height, width) exactly, or
    shortest_edge: int | None  # resize the shorter edge to this, keeping the aspect ratio
    crop: tuple[int, int] | None  # then center-crop to (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "bicubic"

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Preprocess:
        size = config.get("size") if config.get("do_resize", True) else None
        exact, shortest = None, None
        if isinstance(size, int):
            shortest = size
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict) and {"height", "width"} <= set(size):
            exact = (int(size["height"]), int(size["width"]))
        elif size is not None:
            raise ValueError(f"{where}: image size {size!r} is not shortest_edge or height/width, which unilip follows")
        crop = None
        if config.get("do_center_crop"):
            value = config.get("crop_size")
            crop = (value, value) if isinstance(value, int) else (int(value["height"]), int(value["width"]))
        mean = tuple(config.get("image_mean", IMAGENET_MEAN)) if config.get("do_normalize", True) else (0.0,) * 3
        std = tuple(config.get("image_std", IMAGENET_STD)) if config.get("do_normalize", True) else (1.0,) * 3
        return cls(exact, shortest, crop, mean, std, _RESAMPLE.get(int(config.get("resample", 3)), "bicubic"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised pixel values at the encoder's input size."""
        images = images.float()
        height, width = images.shape[-2:]
        target = self.size
        if target is None and self.shortest_edge is not None:  # the longer side rounded down, as transformers does
            short, long = sorted((height, width))
            longer = int(self.shortest_edge * long / short)
            target = (self.shortest_edge, longer) if height <= width else (longer, self.shortest_edge)
        if target is not None and tuple(target) != (height, width):
            antialias = self.mode in ("bilinear", "bicubic")
            images = F.interpolate(images, size=target, mode=self.mode, antialias=antialias, align_corners=None)
            images = images.clamp(0, 1)
        if self.crop is not None:
            crop_h, crop_w = self.crop
            top, left = (images.shape[-2] - crop_h) // 2, (images.shape[-1] - crop_w) // 2
            images = images[..., max(top, 0) : max(top, 0) + crop_h, max(left, 0) : max(left, 0) + crop_w]
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


class ImageEncoder(nn.Module):
    """A frozen vision encoder: (B, 3, H, W) images in [0, 1] -> (B, D) pooled features (see the module docstring)."""

    def __init__(self, name: str, model: nn.Module, output: str, preprocess: Preprocess):
        super().__init__()
        self.name, self.model, self.output, self.preprocess = name, model, output, preprocess
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        return getattr(self.model(pixel_values=pixels), self.output).float()


def _family(model_type: str | None, where: str) -> tuple[type, str]:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported encoder; use {sorted(FAMILIES)}")
    import transformers

    class_name, output = FAMILIES[model_type]
    return getattr(transformers, class_name), output


def _vision_config(path, model_type: str):
    """The vision model's config of a checkpoint: a full CLIP / SigLIP checkpoint's vision part, with CLIP's
    projection width (kept at the top level, so the vision model would otherwise build a 512-wide projection)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if model_type in ("clip", "siglip"):
        vision = config.vision_config
        if model_type == "clip":
            vision.projection_dim = config.projection_dim
        return vision
    return config


def build_encoder(spec: EncoderSpec) -> ImageEncoder:
    """The encoder `spec` describes, frozen, in eval mode, on the CPU."""
    if spec.weights is None:
        from transformers import AutoConfig

        cls, output = _family(spec.model_type, f"encoder {spec.name}")
        config = AutoConfig.for_model(spec.model_type, **spec.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = cls(config)
        preprocess = Preprocess((spec.image_size, spec.image_size), None, None, spec.mean, spec.std)
        return ImageEncoder(spec.name, model, output, preprocess)
    option = f"encoder {spec.name} weights"
    path = resolve_pretrained(spec.weights, what=f"{spec.name} encoder weights", option=option)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder {spec.name}: '{path}' has no config.json (give a transformers checkpoint)")
    model_type = read_json(path / "config.json", what=f"encoder {spec.name} config").get("model_type")
    cls, output = _family(model_type, f"encoder {spec.name} ('{path}')")
    processor_file = path / "preprocessor_config.json"
    if not processor_file.is_file():
        raise FileNotFoundError(f"encoder {spec.name}: '{path}' has no preprocessor_config.json (image preparation)")
    preprocess = Preprocess.from_config(read_json(processor_file, what="preprocessor config"), str(processor_file))
    model, info = cls.from_pretrained(str(path), config=_vision_config(path, model_type), output_loading_info=True)
    problems = {kind: info.get(kind) for kind in ("missing_keys", "mismatched_keys") if info.get(kind)}
    if problems:  # transformers re-initialises these at random and only reports it
        raise StateDictMismatchError(
            f"encoder {spec.name}: '{path}' does not fill {cls.__name__} ({problems}); give a checkpoint of that family"
        )
    log.info("similarity encoder %s: %s from %s", spec.name, cls.__name__, path)
    return ImageEncoder(spec.name, model.float(), output, preprocess)


class ReconstructionSimilarity(nn.Module):
    """Several frozen encoders: (source, regenerated) images -> {encoder name: (B,) cosine of pooled features}."""

    def __init__(self, encoders: Sequence[ImageEncoder], weights: Sequence[float] | None = None):
        super().__init__()
        names = [encoder.name for encoder in encoders]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"encoders {names}: give at least one, each with its own name")
        self.encoders = nn.ModuleList(encoders)
        self.weights = dict(zip(names, weights if weights is not None else [1.0] * len(names), strict=True))

    @classmethod
    def from_specs(cls, specs: Sequence[EncoderSpec | dict[str, Any]]) -> ReconstructionSimilarity:
        specs = [spec if isinstance(spec, EncoderSpec) else EncoderSpec(**spec) for spec in specs]
        return cls([build_encoder(spec) for spec in specs], [spec.weight for spec in specs])

    @property
    def names(self) -> list[str]:
        return [encoder.name for encoder in self.encoders]

    def train(self, mode: bool = True) -> ReconstructionSimilarity:
        return super().train(False)

    @torch.no_grad()
    def forward(self, source: torch.Tensor, regenerated: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) and (B, 3, H', W') in [0, 1] (sizes may differ: each is prepared on its own)."""
        return {
            encoder.name: F.cosine_similarity(encoder(source), encoder(regenerated.to(source.device)), dim=-1)
            for encoder in self.encoders
        }

    def weighted(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum over encoders of weight x cosine: (B,)."""
        return sum(self.weights[name] * scores[name] for name in self.names)


def overall(means: dict[str, float]) -> float:
    """Unified-Bench's overall score: the plain mean of the encoders' mean similarities."""
    return sum(means.values()) / len(means)


def describe(specs: Sequence[EncoderSpec]) -> list[dict[str, Any]]:
    """What each encoder was (for reports): name, weights or the random model type."""
    return [
        {"name": s.name, "weights": s.weights if s.weights else f"random {s.model_type} (seed {s.seed})"} for s in specs
    ]
