"""A tokenizer from pretrained weights: `build_tokenizer` (what the presets in conf/model/ instantiate) fills a new
tokenizer's encoder from the encoder's home checkpoint and its pixel decoder from diffusers' DC-AE;
`load_tokenizer` reads every form a trained tokenizer comes in (a `save_pretrained` directory or hub id, a
released UniLIP `.pth`)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from unilip.errors import ConfigError
from unilip.models.hub import load_strict, read_tensors, resolve_pretrained
from unilip.models.presets import tokenizer_preset
from unilip.models.tokenizer import CONFIG_NAME, TokenizerConfig, UniLIPTokenizer
from unilip.pretrained.homes import home_of
from unilip.pretrained.internvl import load_unilip_checkpoint

log = logging.getLogger(__name__)


def load_encoder(tokenizer: UniLIPTokenizer, name_or_path: str | Path) -> None:
    """Load the encoder from its home checkpoint (hub id or directory), every key matched: an InternVL
    checkpoint for InternViT, a SigLIP / SigLIP 2 / DINOv2 checkpoint for those."""
    home_of(tokenizer.encoder).load(name_or_path)


def load_internvl(tokenizer: UniLIPTokenizer, name_or_path: str | Path) -> None:
    """Load the vision tower and projector from an InternVL checkpoint (transformers format)."""
    if tokenizer.config.encoder != "internvit":
        raise ConfigError(f"InternVL weights for a {tokenizer.config.encoder} encoder; use model.encoder_weights")
    load_encoder(tokenizer, name_or_path)


def load_dcae_decoder(tokenizer: UniLIPTokenizer, name_or_path: str | Path) -> None:
    """Load the pixel decoder from a diffusers `AutoencoderDC` checkpoint (e.g. dc-ae-f32c32-sana-1.1)."""
    path = resolve_pretrained(name_or_path, what="DC-AE weights", option="model.decoder_weights")
    if (path / "vae").is_dir() and not list(path.glob("*.safetensors")):
        path = path / "vae"  # a full SANA pipeline directory
    prefix, tensors = read_tensors(path, ("decoder.",))
    load_strict(tokenizer.decoder, tensors, what=f"'{path}' ({prefix}*)")
    log.info("loaded DC-AE decoder from %s", path)


def build_tokenizer(
    config: TokenizerConfig,
    internvl_weights: str | None = None,
    decoder_weights: str | None = None,
    device: str | torch.device | None = None,
    encoder_weights: str | None = None,
) -> UniLIPTokenizer:
    """Build a tokenizer, loading the pretrained encoder and DC-AE decoder if given.

    `encoder_weights` is the encoder's home checkpoint (hub id or directory); `internvl_weights` is its
    name in the InternViT presets. With `device="meta"` nothing is allocated (for counting parameters);
    weights are then not loaded. Without weights the parts stay randomly initialised, which is what the
    `tiny` presets and the tests want, and what a real run never silently gets: the real presets name
    their weights, and a missing path is an error.
    """
    if internvl_weights and encoder_weights:
        raise ConfigError("model.internvl_weights and model.encoder_weights both given; they name the same weights")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = UniLIPTokenizer(config)
    if str(device) == "meta":
        return model
    if internvl_weights:
        load_internvl(model, internvl_weights)
    if encoder_weights:
        load_encoder(model, encoder_weights)
    if decoder_weights:
        load_dcae_decoder(model, decoder_weights)
    return model


def load_tokenizer(source: str | Path, *, preset: str | None = None) -> UniLIPTokenizer:
    """Load a tokenizer from a `save_pretrained` directory or hub id, or a released UniLIP `.pth`.

    A released `.pth` holds weights only, so it needs `preset` (`unilip_1b` or `unilip_2b`).
    """
    path = Path(source)
    if path.suffix in (".pth", ".pt"):
        if preset is None:
            raise ConfigError(f"'{path}' is a released UniLIP checkpoint; pass its preset (unilip_1b or unilip_2b)")
        return load_unilip_checkpoint(path, tokenizer_preset(preset))
    if path.is_dir() and not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"'{path}' is a directory without {CONFIG_NAME}: not a saved tokenizer")
    return UniLIPTokenizer.from_pretrained(source)
