"""Where a run's starting weights and its distillation teacher come from.

Stage 2 starts from stage 1's EMA weights (`init_from`: a run directory, a Lightning
checkpoint or a saved tokenizer) and distils towards the ORIGINAL encoder. Stage 1 never
trains the encoder, so its encoder is the original; a stage-2 output's is not, so every
saved tokenizer records its lineage (`encoder_trained`, `teacher`) and a later run (e.g.
stage 2 at 448 px from stage 2 at 224 px) finds the right teacher without a hand-edited path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unilip.models.hub import load_strict, read_json
from unilip.models.tokenizer import CONFIG_NAME, FrozenEncoder, TokenizerConfig, UniLIPTokenizer
from unilip.pretrained import load_encoder
from unilip.training.checkpoints import ema_state, locate, read_checkpoint
from unilip.training.config import ConfigError

log = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = (
    "encoder",
    "vision",
    "llm_hidden_size",
    "downsample_ratio",
    "num_residual_blocks",
    "latent_channels",
    "decoder",
)

# What decides the features a teacher computes (the distillation target).
ENCODER_FIELDS = ("encoder", "vision", "llm_hidden_size", "downsample_ratio", "image_mean", "image_std")


@dataclass
class TrainedTokenizer:
    tokenizer: UniLIPTokenizer
    source: str  # the file or directory it was read from
    lineage: dict[str, Any]  # {"stage", "encoder_trained", "teacher"}


def _from_state(config: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> UniLIPTokenizer:
    with torch.device("meta"):
        model = UniLIPTokenizer(TokenizerConfig(**config))
    load_strict(model, state, what=what)
    model._set_normalisation()
    return model


def load_trained_tokenizer(path: str | Path) -> TrainedTokenizer:
    """Load the tokenizer (EMA weights) of a run directory, a Lightning checkpoint or a saved tokenizer."""
    located = locate(path, "tokenizer")
    if (located / CONFIG_NAME).exists():
        meta = read_json(located / CONFIG_NAME, what="tokenizer config")
        return TrainedTokenizer(UniLIPTokenizer.from_pretrained(located), str(located), meta.get("training", {}))
    checkpoint = read_checkpoint(located, "tokenizer")
    if checkpoint is None:
        raise ConfigError(
            f"{path} is not a run directory, a unilip checkpoint or a saved tokenizer "
            f"(no tokenizer/{CONFIG_NAME}, checkpoints/last.ckpt or {CONFIG_NAME} there)"
        )
    meta = checkpoint["unilip"]
    state = ema_state(checkpoint["state_dict"], "tokenizer")
    model = _from_state(meta["tokenizer_config"], state, f"tokenizer weights in {located}")
    return TrainedTokenizer(model, str(located), _lineage(meta))


def load_any_tokenizer(source: str | Path, config: TokenizerConfig | None = None) -> TrainedTokenizer:
    """`load_trained_tokenizer`, or a released UniLIP `.pth`, which holds weights only and so needs `config`.
    Released weights are the authors' stage-2 output: the encoder is trained, the teacher unrecorded."""
    path = Path(source)
    if path.suffix not in (".pth", ".pt"):
        return load_trained_tokenizer(path)
    if config is None:
        raise ConfigError(f"'{path}' is a released UniLIP checkpoint; give its preset (unilip_1b or unilip_2b)")
    from unilip.pretrained.internvl import load_unilip_checkpoint

    return TrainedTokenizer(load_unilip_checkpoint(path, config), str(path), {"encoder_trained": True})


def _lineage(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: meta.get(key) for key in ("stage", "encoder_trained", "teacher")}


def check_same_architecture(config: TokenizerConfig, preset: TokenizerConfig, source: str) -> TokenizerConfig:
    """Refuse weights of another size than the chosen preset; keep the preset's run-time options."""
    differs = [f for f in ARCHITECTURE_FIELDS if getattr(config, f) != getattr(preset, f)]
    if differs:
        raise ConfigError(
            f"init_from={source} is a different tokenizer than the chosen model preset "
            f"(differs in {', '.join(differs)}); choose the model preset it was trained with"
        )
    return dataclasses.replace(config, pad_to_multiple=preset.pad_to_multiple)


def build_teacher(
    teacher_from: str | None, init: TrainedTokenizer, preset: TokenizerConfig
) -> tuple[FrozenEncoder, str]:
    """The frozen original encoder for stage-2 distillation, and a string saying where it came from."""
    if teacher_from is None:
        if not init.lineage.get("encoder_trained"):
            return FrozenEncoder(init.tokenizer), init.source  # a stage-1 encoder is the original
        teacher_from = init.lineage.get("teacher")
        if not teacher_from:
            raise ConfigError(
                f"init_from={init.source} has a trained encoder and does not record the original one; "
                "pass teacher_from=<the encoder's home checkpoint (e.g. InternVL) or stage-1 run>"
            )
    source = Path(teacher_from)
    located = locate(source, "tokenizer")
    if source.exists() and (
        ((located / CONFIG_NAME).exists() and _is_tokenizer_dir(located)) or located.suffix == ".ckpt"
    ):
        teacher_init = load_trained_tokenizer(source)
        if teacher_init.lineage.get("encoder_trained"):
            raise ConfigError(f"teacher_from={teacher_from} has a trained encoder; the teacher must be the original")
        differs = [f for f in ENCODER_FIELDS if getattr(teacher_init.tokenizer.config, f) != getattr(preset, f)]
        if differs:
            raise ConfigError(
                f"teacher_from={teacher_from} holds another encoder than the chosen model preset (differs in "
                f"{', '.join(differs)}); give the original encoder of this tokenizer"
            )
        return FrozenEncoder(teacher_init.tokenizer), teacher_init.source
    # the encoder's home checkpoint (hub id or directory: InternVL, SigLIP, DINOv2): read its encoder
    with torch.device("meta"):
        shell = UniLIPTokenizer(preset)
    shell.to_empty(device="cpu")
    shell._set_normalisation()
    load_encoder(shell, teacher_from)
    log.info("distillation teacher: the encoder of %s", teacher_from)
    return FrozenEncoder(shell), str(teacher_from)


def _is_tokenizer_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("format") == "unilip-tokenizer"
    except (OSError, json.JSONDecodeError):
        return False
