"""Start-up checks of a composed evaluation config (conf/eval.yaml): every mistake in one line, before the
tokenizer is loaded (the typed schema of `unilip.schema`, as train.py's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from omegaconf import DictConfig

from unilip.errors import ConfigError
from unilip.schema import Data, Trainer, problems, value


@dataclass
class EvalConfig:
    data: Data
    trainer: Trainer
    preset: str | None = value(hint="for a released .pth: unilip_1b or unilip_2b")
    protocol: int = value(ge=1, hint="256: pad to 280 and crop back, as the paper; 448; or another image size")
    # unilip.evaluation.protocols.RESIZES (a test keeps the two equal; importing it here would load the models)
    protocol_resize: Literal["project", "reference"] = value()
    # unilip.evaluation.quantize.QUANTIZE (the same test keeps them equal)
    quantize: Literal["trunc", "round", "reference"] = value(
        hint="trunc (the reference evaluator's uint8 conversion), round (saved PNGs), reference (its whole path)"
    )
    batch_size: int = value(ge=1, hint="per device")
    grid_images: int = value(ge=0)
    seed: int = value(ge=0, lt=2**32)
    teacher: str | None = value()
    external_features: str | None = value()
    lpips_vgg_weights: str | None = value()
    inception_weights: str | None = value()
    fid_reference_cache: str | None = value()


def check_eval_config(cfg: DictConfig) -> None:
    """Refuse, in one line naming every bad key, an evaluation config that cannot run."""
    found = problems(cfg, EvalConfig, "")
    if found:
        raise ConfigError("; ".join(found))
