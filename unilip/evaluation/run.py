"""What `python eval.py` does: load the tokenizer, pick the protocol, run one pass, write the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.entry import start_run
from unilip.evaluation.config import check_eval_config
from unilip.evaluation.fid_reference import ReferenceStatistics
from unilip.evaluation.metrics import ExternalFeatures, build_fid
from unilip.evaluation.module import ReconstructionEvaluation
from unilip.evaluation.report import describe_protocol, incomplete_warning, write_report
from unilip.logs import quiet_third_party_noise
from unilip.models.presets import tokenizer_preset
from unilip.models.tokenizer import FrozenEncoder
from unilip.training.config import ConfigError
from unilip.training.lineage import TrainedTokenizer, build_teacher, load_any_tokenizer

log = logging.getLogger(__name__)


def load_evaluated(ckpt: str, preset: str | None) -> TrainedTokenizer:
    """A run directory, Lightning checkpoint, saved tokenizer or released UniLIP `.pth`."""
    path = Path(ckpt)
    if path.suffix in (".pth", ".pt") and preset is None:
        raise ConfigError(f"ckpt={ckpt} is a released UniLIP file; pass preset=unilip_1b or preset=unilip_2b")
    if not path.exists():
        raise ConfigError(f"ckpt={ckpt} does not exist; give a run directory, a checkpoint or a saved tokenizer")
    return load_any_tokenizer(path, tokenizer_preset(preset) if preset else None)


def resolve_teacher(cfg: DictConfig, evaluated: TrainedTokenizer, notes: list[str]) -> FrozenEncoder | None:
    preset = tokenizer_preset(cfg.preset) if cfg.preset else evaluated.tokenizer.config
    try:
        teacher, source = build_teacher(cfg.teacher, evaluated, preset)
    except ConfigError as error:
        notes.append(f"feature fidelity not measured: {error}")
        log.warning(notes[-1])
        return None
    notes.append(f"feature fidelity measured against the encoder of {source}")
    return teacher


def build_lpips(weights: str | None, notes: list[str]) -> torch.nn.Module | None:
    from unilip.losses.perceptual import LPIPSLoss, _torchvision_vgg16_cached

    if weights is None and not _torchvision_vgg16_cached():
        notes.append("LPIPS not measured: no VGG-16 weights (set lpips_vgg_weights=<vgg16-397923af.pth>)")
        log.warning(notes[-1])
        return None
    return LPIPSLoss(weights)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt` on `cfg.data`'s validation shards; returns the results written to `cfg.out_dir`."""
    quiet_third_party_noise()
    check_eval_config(cfg)
    resize = cfg.get("protocol_resize", "project")
    quantize = cfg.get("quantize", "trunc")
    evaluated = load_evaluated(str(cfg.ckpt), cfg.preset)
    tokenizer = evaluated.tokenizer
    tokenizer.config.pad_to_multiple = True  # the paper's 256 px protocol: reflect-pad to 280, crop back
    notes: list[str] = []
    teacher = resolve_teacher(cfg, evaluated, notes)
    lpips = build_lpips(cfg.lpips_vgg_weights, notes)
    fid = build_fid(cfg.inception_weights)
    if fid is None:
        notes.append("rFID not measured: no Inception weights (set inception_weights=<weights-inception-...pth>)")
        log.warning(notes[-1])
    external = ExternalFeatures(cfg.external_features) if cfg.external_features else None
    protocol = describe_protocol(
        cfg.protocol,
        tokenizer.config.input_multiple,
        padded=True,
        lpips=lpips is not None,
        rfid=fid is not None,
        feature_fidelity=teacher is not None,
        external=external is not None,
        resize=resize,
        quantize=quantize,
    )
    log.info("protocol: %s", protocol)

    reference = None
    if fid is not None and cfg.get("fid_reference_cache"):
        reference = ReferenceStatistics(
            cfg.fid_reference_cache, cfg.data.val_urls, cfg.protocol, cfg.inception_weights, quantize
        )
    module = ReconstructionEvaluation(
        tokenizer,
        teacher,
        lpips,
        fid,
        external,
        grid_images=cfg.grid_images,
        resize=resize,
        reference=reference,
        quantize=quantize,
    )
    datamodule = instantiate(cfg.data)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    start_run(cfg.out_dir, rank=trainer.global_rank)
    # frozen helpers live outside the module tree (not moved by Lightning): move them here
    for helper in (teacher, lpips, external):
        if helper is not None:
            helper.to(trainer.strategy.root_device)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.global_rank != 0:
        return {}
    if not module.records:
        raise ConfigError(f"no images were read from data.val_urls={cfg.data.val_urls}")
    if module.fid_note:
        notes.append(module.fid_note)
    elif reference is not None:
        source = "read from" if not module.feed_references else "computed and saved to"
        notes.append(f"rFID reference statistics {source} {reference.path}")
    config = OmegaConf.to_container(cfg, resolve=True)
    if any(module.skipped.values()):
        log.warning(incomplete_warning(module.skipped, len(module.records)))
    results = write_report(
        Path(cfg.out_dir),
        module.records,
        module.fid_value,
        protocol,
        notes,
        config,
        module.grid,
        module.skipped,
        rfid_quantize=quantize if fid is not None else None,
    )
    log.info("results in %s:\n%s", cfg.out_dir, (Path(cfg.out_dir) / "summary.md").read_text())
    return results
