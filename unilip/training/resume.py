"""What a resumed run may change: its config is compared with the one its checkpoint was trained with, before
anything is written.

Every checkpoint holds the resolved config of the run that wrote it (`RecordConfig`, under `unilip_config`,
with the number of processes). `check_resume` compares it with the config of the run that resumes it:

- a change a resumed run cannot continue with (the task, the stage, the model, the image size, the loss, the
  optimiser, the data mix, the seed, ...; everything not in `ALLOWED`) refuses the run, in one line that
  names every such key with its two values;
- a change in `ALLOWED` (where files live, how long the run trains, the hardware, logging, checkpointing and
  validation) is accepted and recorded: `record_resume` appends it to `<run>/resumes.jsonl` and logs it.

What is compared is what the run computes, not how the code is organised: `_target_` (and Hydra's other
instantiation keys) are left out, so a class that moves to another module does not refuse older runs; the
recipe is compared through `recipe` (the chosen stage), not the other stages' blocks. A checkpoint written
before checkpoints held their config is compared with its run's `config.yaml`, or not at all (a warning) when
that is missing.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from unilip.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "unilip_config"
HISTORY = "resumes.jsonl"

# Instantiation plumbing, not computation: a refactor that moves a class must not refuse the runs before it.
NOT_COMPARED_LEAVES = {"_target_", "_convert_", "_partial_", "_recursive_"}
# The chosen stage's recipe is `recipe` (and, for generation, its sources are `data.train_sources`); the other
# stages' blocks do not take part in this run. `resume` is how this run starts, not what it computes.
NOT_COMPARED = ("stages.*", "stage_sources.*", "_stage_name", "resume")

# What a resumed run may change, and why. Everything else is refused when it changes. The global batch
# (data.batch_size x processes) is compared on its own: moving to other hardware keeps it.
ALLOWED: dict[str, str] = {
    # where things live: the same run, data and weights, moved to another disk or read from a local copy
    "paths.*": "where runs and data live",
    "run_dir": "where the run lives",
    "name": "names the run (its folder, its W&B run), not what it computes",
    "data.train_sources.*.urls": "where a source's shards are (names, weights and repeats are compared)",
    "data.val_urls*": "where the validation shards are",
    "data.photos_dir": "where the bundled photos are",
    "data.build_photos": "whether missing bundled photos are built",
    "*_weights": "where published weights are read (a hub id or a local copy)",
    "*.weights": "where published weights are read (a hub id or a local copy)",
    "mllm.text_tokenizer": "where the MLLM's text tokenizer is read",
    "init_from": "where the run started from: the checkpoint holds the trained weights",
    "teacher_from": "where the frozen teacher is read (assumed to be the same weights; logged)",
    "tokenizer_from": "where the frozen tokenizer is read (assumed to be the same weights; logged)",
    "generator_from": "where the frozen generator is read (assumed to be the same weights; logged)",
    "captioner_from": "where the captioner is read (assumed to be the same weights; logged)",
    "mllm_weights": "where the MLLM's weights are read",
    "module.sample_dir": "where validation samples are written",
    "logger.*": "where and how metrics are logged",
    "trainer.default_root_dir": "Lightning's folder (the run's)",
    # how long it trains: the schedule follows the new length from the resumed step on
    "recipe.max_steps": "trains longer or shorter",
    "recipe.epochs": "trains longer or shorter",
    "trainer.max_steps": "trains longer or shorter",
    "trainer.max_epochs": "trains longer or shorter",
    "module.max_steps": "trains longer or shorter",
    # the hardware it runs on, with the same global batch (compared on its own)
    "trainer.devices": "other hardware (the global batch must stay the same)",
    "trainer.num_nodes": "other hardware (the global batch must stay the same)",
    "trainer.accelerator": "other hardware",
    "trainer.strategy*": "how the processes are run (one, DDP; an FSDP2 checkpoint needs FSDP2 to read it)",
    "data.batch_size": "per device; the global batch (data.batch_size x processes) must stay the same",
    "data.num_workers": "loader processes (the data stream continues; its order is not the uninterrupted run's)",
    "data.val_num_workers": "loader processes",
    "data.pin_memory": "host memory pinning",
    "data.prefetch_factor": "loader read-ahead",
    "latent_cache.device": "where the cache command encodes",
    "module.gradient_checkpointing": "memory for compute: the same gradients",
    "module.compile": "torch.compile: the same computation, faster",
    "module.channels_last": "memory layout: the same computation",
    "module.max_nonfinite_streak": "how many bad steps in a row stop the run",
    # what it logs, how often it checkpoints and validates
    "callbacks.*": "checkpointing, throughput, progress, signals: nothing a step computes",
    "checkpoint_every": "checkpoint interval",
    "trainer.log_every_n_steps": "logging interval",
    "trainer.enable_progress_bar": "console output",
    "trainer.enable_model_summary": "console output",
    "trainer.check_val_every_n_epoch": "validation interval",
    "trainer.num_sanity_val_steps": "validation before training",
    "data.val_batch_size": "validation batches",
    "module.sample_*": "validation samples",
    "module.num_samples": "validation samples",
    "module.val_timesteps": "validation losses",
    "module.guidance_scale": "validation sampling",
    "module.flow_shift": "validation sampling",
}

# Keys whose change is accepted but worth a warning: the run assumes the new place holds the same weights.
LOCATIONS_OF_FROZEN_WEIGHTS = ("teacher_from", "tokenizer_from", "generator_from", "captioner_from")


@dataclass
class Resume:
    """A resume that was accepted: from which checkpoint, at which step, with which allowed changes."""

    checkpoint: str
    step: int | None
    changes: dict[str, list[Any]] = field(default_factory=dict)  # key -> [checkpoint's value, this run's]
    compared_with: str = ""  # the checkpoint's config record, its run's config.yaml, or "" (not compared)


class RecordConfig(L.Callback):
    """Store the run's resolved config (and its number of processes) in every checkpoint it writes."""

    def __init__(self, resolved: dict[str, Any]):
        self.resolved = resolved

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.resolved, "world_size": trainer.world_size}


def check_resume(cfg, checkpoint: str | None, world_size: int) -> Resume | None:
    """Compare `cfg` (the resumed run's composed config, `world_size` processes) with what `checkpoint` was
    trained with; refuse (ConfigError) what cannot continue, return the accepted changes. None: no resume."""
    if checkpoint is None:
        return None
    state = _read(Path(checkpoint))
    stored, stored_world, compared_with = _stored_config(Path(checkpoint), state)
    resume = Resume(checkpoint, state.get("global_step"), compared_with=compared_with)
    if stored is None:
        log.warning(
            "resume: %s holds no record of the config it was trained with (written before checkpoints held it) "
            "and its run has no config.yaml: this run's config is not compared with it",
            checkpoint,
        )
        return resume
    now = OmegaConf.to_container(cfg, resolve=True)
    refused, resume.changes = compare(stored, now)
    old_batch, new_batch = stored.get("data", {}).get("batch_size"), now.get("data", {}).get("batch_size")
    if stored_world is None:
        from unilip.training.epochs import world_size as configured_world_size

        stored_world = configured_world_size(OmegaConf.create(stored.get("trainer", {})))
    if None not in (old_batch, new_batch) and old_batch * stored_world != new_batch * world_size:
        refused["global batch (data.batch_size x processes)"] = [
            f"{old_batch * stored_world} ({old_batch} x {stored_world})",
            f"{new_batch * world_size} ({new_batch} x {world_size})",
        ]
    if Path(checkpoint).is_dir() and not _sharded(now.get("trainer", {}).get("strategy")):
        refused["trainer.strategy"] = ["FSDP2 (a sharded checkpoint directory)", "a strategy that reads one file"]
    if refused:
        changes = ", ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
        raise ConfigError(
            f"resume: {checkpoint} was trained with other settings, which a resumed run cannot change: {changes}; "
            "resume with the settings it was trained with (the run's config.yaml), or start a new run from its "
            "weights (name=<new name> init_from=<this run>)"
        )
    return resume


def compare(stored: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """(refused, allowed) differences between two resolved configs: dotted key -> [stored value, new value]."""
    old, new = _flatten(stored), _flatten(now)
    refused, allowed = {}, {}
    for key in sorted(old.keys() | new.keys()):
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_COMPARED):
            continue
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after:
            continue
        target = allowed if any(fnmatch.fnmatchcase(key, pattern) for pattern in ALLOWED) else refused
        target[key] = [before, after]
    return refused, allowed


def record_resume(run_dir: str | Path, resume: Resume | None) -> None:
    """Log the resume and append it to the run's history (`resumes.jsonl`, one JSON object per resume)."""
    if resume is None:
        return
    changes = ", ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in resume.changes.items())
    log.info("resuming from %s at step %s; changed since: %s", resume.checkpoint, resume.step, changes or "nothing")
    for key in resume.changes:
        if key in LOCATIONS_OF_FROZEN_WEIGHTS:
            log.warning("resume: %s moved; the run continues assuming it holds the same weights", key)
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": resume.checkpoint,
        "step": resume.step,
        "compared_with": resume.compared_with or None,
        "changes": {key: [_plain(old), _plain(new)] for key, (old, new) in resume.changes.items()},
    }
    with open(Path(run_dir) / HISTORY, "a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------ reading a checkpoint's record
class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


_ABSENT = _Absent()


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint's non-tensor state (a file, or an FSDP2 directory's meta.pt), memory-mapped."""
    file = path / "meta.pt" if path.is_dir() else path
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a zip that is not a whole checkpoint, say
        raise ConfigError(f"resume: {file} cannot be read ({error}); resume from an earlier checkpoint") from None
    return state if isinstance(state, dict) else {}


def _stored_config(path: Path, state: dict[str, Any]) -> tuple[dict | None, int | None, str]:
    record = state.get(CHECKPOINT_KEY)
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        return record["config"], record.get("world_size"), "checkpoint's config record"
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    if run is not None and (run / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)
        log.info("resume: %s holds no config record (an older checkpoint); comparing with its run's config.yaml", path)
        return config, None, f"{run / 'config.yaml'}"
    return None, None, ""


def _sharded(strategy: Any) -> bool:
    """Whether a trainer's strategy (its config) reads and writes sharded checkpoint directories (FSDP)."""
    from hydra.utils import get_class
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    target = strategy.get("_target_") if isinstance(strategy, dict) else strategy
    if not isinstance(target, str):
        return False
    if target.startswith("fsdp"):  # Lightning's own names: "fsdp", "fsdp_cpu_offload"
        return True
    try:
        return issubclass(get_class(target), (FSDPStrategy, ModelParallelStrategy))
    except Exception:  # a registered name ("ddp", "auto") or a class that cannot be imported
        return False


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaves; lists of scalars are one leaf, lists of groups are indexed (`train_sources.0.urls`)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, item in tree.items():
            if key not in NOT_COMPARED_LEAVES:
                out |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        out = {}
        for index, item in enumerate(tree):
            out |= _flatten(item, f"{prefix}.{index}")
        return out
    return {prefix: tree}


def _show(item: Any) -> str:
    text = str(item)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(item: Any) -> Any:
    return None if item is _ABSENT else item
