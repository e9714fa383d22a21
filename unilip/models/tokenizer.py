"""The UniLIP tokenizer: a semantic encoder -> 32-channel latent -> DC-AE decoder.

    image (B, 3, H, W) in [0, 1]
      -> the encoder's normalisation -> the encoder (UniLIP: InternViT, drop CLS, pixel shuffle 0.5, projector `mlp1`)
      =  features (B, H/m * W/m, D)            what the encoder's home model consumes and stage 2 distils
      -> 3 residual MLP blocks -> down MLP
      =  latent (B, 32, H/m, W/m)               what the DiT generates in (m = 28 for InternViT)
      -> DC-AE decoder (x32) -> bilinear resize to (H, W)
      =  reconstruction (B, 3, H, W), nominally in [0, 1]

The encoder is one of `unilip.models.encoders` (InternViT, SigLIP / SigLIP 2, DINOv2), each through
transformers' own model classes, so the trained encoder drops back into its home model unchanged
(`python -m unilip.export`). The decoder is diffusers' DC-AE `Decoder`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_dc import Decoder
from safetensors.torch import save_file
from torch import nn
from transformers import InternVLConfig, PretrainedConfig

from unilip.errors import ConfigError
from unilip.models.encoders import Encoder, encoder_class
from unilip.models.hub import (
    WeightsNotFoundError,
    load_safetensors,
    load_strict,
    read_json,
    resolve_pretrained,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "unilip-tokenizer"


@dataclass
class TokenizerConfig:
    """Everything needed to build a `UniLIPTokenizer`; presets live in `conf/model/`.

    Attributes:
        vision: keyword arguments of the encoder's transformers vision config (`InternVLVisionConfig`,
            `SiglipVisionConfig`, `Siglip2VisionConfig`, `Dinov2Config`, `Dinov2WithRegistersConfig`).
        encoder: which encoder (`unilip.models.encoders.ENCODERS`): internvit (UniLIP), siglip, siglip2,
            dinov2, dinov2_with_registers.
        llm_hidden_size: internvit only: output width of the InternVL projector, i.e. the LLM's hidden
            size (896 for InternVL3-1B, 1536 for InternVL3-2B).
        downsample_ratio: token merge: 0.5 merges 2x2 patch tokens into one feature (InternVL's pixel
            shuffle for internvit, a plain 2x2 concatenation for the others), 1.0 keeps every token.
        projector_hidden_act: activation inside the InternVL projector.
        num_residual_blocks: residual MLP blocks between projector and latent (3 in UniLIP).
        latent_channels: channels of the latent the decoder reads (32, DC-AE f32c32).
        decoder: keyword arguments of diffusers' DC-AE `Decoder` (without the channel counts).
        image_mean, image_std: normalisation the encoder was trained with; None: the encoder's own
            (ImageNet for InternViT and DINOv2, 0.5 / 0.5 for SigLIP).
        pad_to_multiple: reflect-pad inputs whose size is not a multiple of `input_multiple`
            (28 for InternViT) and crop the reconstruction back, as the paper's 256 px evaluation does.
            If False such inputs are an error.
        latent_scale: the factor that gives these weights' latents unit standard deviation, which the
            generation DiT is trained on (`x * latent_scale`). Measured per set of weights
            (`python -m unilip.evaluation.latent_stats`) and stored with the saved tokenizer; the
            released weights' are the authors' 10.6 (UniLIP-1B) and 9.5 (UniLIP-3B). None: not measured.
    """

    vision: dict[str, Any]
    llm_hidden_size: int | None = None
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    num_residual_blocks: int = 3
    latent_channels: int = 32
    decoder: dict[str, Any] = field(default_factory=dict)
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    pad_to_multiple: bool = True
    latent_scale: float | None = None
    encoder: str = "internvit"

    def __post_init__(self) -> None:
        self.vision = dict(self.vision)
        self.decoder = dict(self.decoder)
        kind = self.encoder_class()
        self.image_mean = tuple(self.image_mean if self.image_mean is not None else kind.image_mean)
        self.image_std = tuple(self.image_std if self.image_std is not None else kind.image_std)
        if round(1 / self.downsample_ratio) != 1 / self.downsample_ratio:
            raise ConfigError(f"downsample_ratio={self.downsample_ratio}: use 0.5 (2x2 token merge) or 1.0 (none)")
        patch = kind.patch_size(self.vision)
        if int(patch / self.downsample_ratio) != patch / self.downsample_ratio:
            raise ValueError(f"patch_size {patch} / downsample_ratio {self.downsample_ratio} must be an integer")
        kind.check_config(self)

    def encoder_class(self) -> type[Encoder]:
        return encoder_class(self.encoder)

    def vision_config(self) -> PretrainedConfig:
        """The encoder's transformers vision config (`InternVLVisionConfig` for internvit)."""
        return self.encoder_class().vision_config(self.vision)

    def internvl_config(self) -> InternVLConfig:
        """An `InternVLConfig` carrying the vision and projector sizes (the LLM part is a stub)."""
        return InternVLConfig(
            vision_config=self.vision,
            text_config={"model_type": "qwen2", "hidden_size": self.llm_hidden_size},
            downsample_ratio=self.downsample_ratio,
            projector_hidden_act=self.projector_hidden_act,
        )

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (28 = patch 14 / pixel-shuffle 0.5)."""
        return int(self.encoder_class().patch_size(self.vision) / self.downsample_ratio)

    @property
    def feature_width(self) -> int:
        """D of the (B, N, D) features: the projector's output for internvit, else the ViT's width x merge."""
        return self.encoder_class().feature_width(self)

    @property
    def decoder_factor(self) -> int:
        """Spatial upsampling of the DC-AE decoder (32 for f32c32)."""
        return 2 ** (len(self.decoder["block_out_channels"]) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ResidualMLP(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x)))), the UniLIP bottleneck block."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width, eps=1e-6), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TokenizerOutput(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W), nominally [0, 1], not clamped so gradients flow
    features: torch.Tensor  # (B, N, D) post-projector features of the (padded) input
    latent: torch.Tensor  # (B, C, h, w)


class UniLIPTokenizer(nn.Module):
    """One module for every UniLIP size and encoder; sizes and encoders are `TokenizerConfig` presets.

    Parts, as the training stages see them (`parts()`):
        encoder:    the encoder's modules: `vision_tower` (+ `multi_modal_projector` for InternViT)
                    (frozen in stage 1, 0.1x LR in stage 2)
        bottleneck: `residual_blocks` + `down_mlp`
        decoder:    `decoder`
    Parameters the encoder's features never use (`encoder.unused_parameters()`: SigLIP's pooling head,
    DINOv2's mask token) belong to no part: they never train and are kept for the way home.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        encoder = config.encoder_class()(config)
        # The encoder's modules are the tokenizer's own children, under the names they have in the encoder
        # (vision_tower, multi_modal_projector), so the weights keep the names they always had; `encoder` is
        # the same modules seen through the interface (features, blocks, home), kept out of the module tree
        # so that they are not registered twice.
        for name, module in encoder.named_children():
            self.add_module(name, module)
        self.__dict__["encoder"] = encoder
        width = config.feature_width
        self.residual_blocks = nn.ModuleList(ResidualMLP(width) for _ in range(config.num_residual_blocks))
        self.down_mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, config.latent_channels),
            nn.GELU(),
            nn.Linear(config.latent_channels, config.latent_channels),
        )
        self.decoder = Decoder(in_channels=3, latent_channels=config.latent_channels, **config.decoder)
        self._set_normalisation()

    def _set_normalisation(self, device: str | torch.device | None = None) -> None:
        # Not persistent: the config holds them, and a model built on `meta` re-creates them here (with the
        # encoder's own unsaved buffers, e.g. SigLIP's position ids).
        for name, values in (("image_mean", self.config.image_mean), ("image_std", self.config.image_std)):
            self.register_buffer(name, torch.tensor(values, device=device).view(1, 3, 1, 1), persistent=False)
        self.encoder.restore_buffers(device)

    def parts(self) -> dict[str, list[nn.Module]]:
        """The tokenizer's modules grouped as the training recipe treats them."""
        return {
            "encoder": list(self.encoder.children()),
            "bottleneck": [self.residual_blocks, self.down_mlp],
            "decoder": [self.decoder],
        }

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters a part trains (without the encoder's unused ones)."""
        unused = {id(p) for p in self.encoder.unused_parameters()}
        return [p for module in self.parts()[part] for p in module.parameters() if id(p) not in unused]

    # ------------------------------------------------------------------ sizes and padding
    def check_size(self, height: int, width: int) -> None:
        """Raise if (height, width) is not usable; with padding on every size is."""
        multiple = self.config.input_multiple
        if not self.config.pad_to_multiple and (height % multiple or width % multiple):
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {multiple}; use a multiple of {multiple} "
                f"(224, 448) or enable padding (model.config.pad_to_multiple=true)"
            )

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Reflect-pad (B, 3, H, W) to the next multiple of 28; returns (padded, (left, right, top, bottom))."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        self.check_size(height, width)
        multiple = self.config.input_multiple
        pad_h, pad_w = -height % multiple, -width % multiple
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        if pad_h or pad_w:
            images = F.pad(images, padding, mode="reflect")
        return images, padding

    # ------------------------------------------------------------------ the pipeline
    def _features(self, padded: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Padded (B, 3, H, W) in [0, 1] -> ((B, N, D) features, (H/28, W/28) grid)."""
        pixel_values = (padded - self.image_mean) / self.image_std
        return self.encoder(pixel_values)

    def latent_from_features(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) projector features on an (h, w) grid -> (B, C, h, w) latent."""
        x = features
        for block in self.residual_blocks:
            x = block(x)
        x = self.down_mlp(x)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D) post-projector features, N = ceil(H/28) * ceil(W/28).

        For InternViT these are exactly InternVL's `get_image_features(...).pooler_output` for the same
        image; for the others, the home model's last hidden state on the patch grid (token-merged).
        """
        padded, _ = self._pad(images)
        return self._features(padded)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 32, ceil(H/m), ceil(W/m)) latent, m = `config.input_multiple` (28)."""
        padded, _ = self._pad(images)
        return self.latent_from_features(*self._features(padded))

    def decode(self, latent: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 32, h, w) latent -> (B, 3, *size) image, size defaulting to (28 h, 28 w).

        The DC-AE decoder outputs [-1, 1] at 32x the latent size; this resizes it bilinearly
        to `size` and maps it to [0, 1] as (y + 1) / 2. The result is not clamped (losses need
        the gradient outside the range): clamp before display or 8-bit conversion.
        """
        if size is None:
            size = (latent.shape[-2] * self.config.input_multiple, latent.shape[-1] * self.config.input_multiple)
        decoded = self.decoder(latent.to(self.decoder.conv_in.weight.dtype))
        decoded = F.interpolate(decoded, size=tuple(size), mode="bilinear", align_corners=False)
        return (decoded + 1) / 2

    def reconstruct(self, images: torch.Tensor) -> TokenizerOutput:
        """Full pass, keeping the intermediate features and latent (what training needs)."""
        height, width = images.shape[-2:]
        padded, (left, _, top, _) = self._pad(images)
        features, grid = self._features(padded)
        latent = self.latent_from_features(features, grid)
        decoded = self.decode(latent, size=padded.shape[-2:])
        if padded.shape[-2:] != images.shape[-2:]:
            decoded = decoded[..., top : top + height, left : left + width]
        return TokenizerOutput(decoded, features, latent)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> reconstruction (B, 3, H, W), nominally in [0, 1]."""
        return self.reconstruct(images).images

    # ------------------------------------------------------------------ weights in and out (its own format)
    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> None:
        """Write `config.json` and `model.safetensors`; `from_pretrained` restores it bit for bit.

        `training` (optional) records how the weights were made (stage, whether the encoder
        was trained, where the distillation teacher came from) for the runs that start from them.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "config": self.config.to_dict()}
        if training is not None:
            meta["training"] = training
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        state = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> UniLIPTokenizer:
        """Load a tokenizer written by `save_pretrained` (a directory or a hub id)."""
        path = resolve_pretrained(name_or_path, what="UniLIP tokenizer", option="the tokenizer path")
        config_file = path / CONFIG_NAME
        if not config_file.exists():
            raise WeightsNotFoundError(f"'{path}' has no {CONFIG_NAME}; it is not a save_pretrained directory")
        meta = read_json(config_file, what="tokenizer config")
        if meta.get("format") != FORMAT:
            raise WeightsNotFoundError(
                f"'{config_file}' is not a UniLIP tokenizer config (format={meta.get('format')!r}); give a directory "
                "written by save_pretrained"
            )
        with torch.device("meta"):
            model = cls(TokenizerConfig(**meta["config"]))
        state = load_safetensors(path / WEIGHTS_NAME, what="tokenizer weights", device=str(device))
        load_strict(model, state, what=f"'{path / WEIGHTS_NAME}'")
        model._set_normalisation(device)
        return model.to(dtype=dtype) if dtype is not None else model


class FrozenEncoder(nn.Module):
    """A frozen copy of a tokenizer's encoder (e.g. ViT + projector): the stage-2 distillation teacher.

    `features(images)` is `UniLIPTokenizer.features` of the weights at copy time. It holds no
    decoder, so it costs only the encoder's memory.
    """

    def __init__(self, tokenizer: UniLIPTokenizer):
        super().__init__()
        import copy

        self.config = tokenizer.config
        self.encoder = copy.deepcopy(tokenizer.encoder)
        self.register_buffer("image_mean", tokenizer.image_mean.clone(), persistent=False)
        self.register_buffer("image_std", tokenizer.image_std.clone(), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D), padding like the tokenizer.

        Computed in inference mode (no autograd bookkeeping at all); the result is a copy that
        can serve as a loss target.
        """
        with torch.inference_mode():
            height, width = images.shape[-2:]
            multiple = self.config.input_multiple
            pad_h, pad_w = -height % multiple, -width % multiple
            if pad_h or pad_w:
                padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
                images = F.pad(images, padding, mode="reflect")
            pixel_values = (images - self.image_mean) / self.image_std
            features = self.encoder(pixel_values)[0]
        return features.clone()
