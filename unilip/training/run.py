"""What `python train.py` does: check the config, build the parts, fit, save the result.

The task's LightningModule comes from the builder its `conf/task/<task>.yaml` names (`builder`, a `_target_`):
this module, like the rest of `unilip.training`, imports no task."""

from __future__ import annotations

import logging
import signal
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.entry import start_run
from unilip.logs import quiet_third_party_noise
from unilip.training.checkpoints import RunCheckpoint
from unilip.training.config import ConfigError, check_train_config
from unilip.training.epochs import plan_steps, world_size
from unilip.training.loggers import logger_resume_arguments
from unilip.training.nonfinite import NonFiniteStreak
from unilip.training.requeue import SlurmRequeue, StopOnSignal
from unilip.training.resume import RecordConfig, check_resume, record_resume

log = logging.getLogger(__name__)


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch (for Lightning's throughput monitor): images, or cached latents."""
    return len(batch["key"]) if "key" in batch else batch["image"].shape[0]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to silently overwrite a run."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto":
        if last.exists():
            log.info("resuming from %s", last)
            return _readable_checkpoint(last, run_dir)
        log.info("resume=auto: no checkpoint in %s yet, starting from the beginning", run_dir)
        return None
    if cfg.resume is not None:
        return _readable_checkpoint(Path(cfg.resume), run_dir)
    if last.exists():
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
            "or name=<new name> for a new one"
        )
    return None


def _readable_checkpoint(path: Path, run_dir: Path) -> str:
    """Refuse, before anything is built, a checkpoint Lightning could not read (missing, truncated, not one);
    the message names the latest earlier checkpoint that can be read, if there is one."""
    if _is_checkpoint(path):
        return str(path)
    if not path.exists():
        problem = "does not exist"
    elif path.is_dir():
        problem = "is a directory that holds no checkpoint (an FSDP2 checkpoint has a .metadata file)"
    else:
        problem = "is not a readable checkpoint (truncated, or not a torch.save file)"
    raise ConfigError(f"resume: {path} {problem}; {_earlier_checkpoint(path, run_dir)}")


def _earlier_checkpoint(path: Path, run_dir: Path) -> str:
    """Where to resume instead: the latest readable step checkpoint beside `path`, else in the run's folder."""
    for folder in dict.fromkeys([path.parent, run_dir / "checkpoints"]):
        earlier = sorted(p for p in folder.glob("step*.ckpt") if p != path and _is_checkpoint(p))
        if earlier:  # step<7 digits>.ckpt: the name order is the step order
            return f"resume from the latest earlier one: resume={earlier[-1]}"
    return f"there is no earlier checkpoint in {path.parent}; give another one, or start again with a new name="


def _is_checkpoint(path: Path) -> bool:
    """A file torch.save wrote (a zip archive), or an FSDP2 checkpoint directory."""
    return (path.is_file() and zipfile.is_zipfile(path)) or (path.is_dir() and (path / ".metadata").exists())


def train(cfg: DictConfig) -> Path:
    """Run one training job described by a composed `conf/train.yaml`; returns the run directory."""
    quiet_third_party_noise()
    check_train_config(cfg)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # fp32 matmuls and convolutions on tensor cores (recipe)
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    run_dir = Path(cfg.run_dir)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "prepare"):
        datamodule.prepare()  # the bundled photos are built (once) before the step plan counts the shards
    plan_steps(cfg, datamodule)  # recipe.epochs -> trainer.max_steps; logs samples, epochs, steps, global batch
    resumed = check_resume(cfg, ckpt_path, world_size(cfg.trainer))  # what it changes: refused, or recorded below
    if hasattr(datamodule, "read_one_validation_sample"):
        datamodule.read_one_validation_sample()  # unreadable validation data is found now, not at step 1000
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = instantiate(cfg.builder)(cfg)  # the task's builder (conf/task/<task>.yaml); every module has save_result
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values() if callback]
    callbacks.append(RecordConfig(resolved))  # checkpoints hold the config they were trained with
    logger = (
        instantiate(cfg.logger, **logger_resume_arguments(cfg.logger.get("_target_"), ckpt_path))
        if cfg.logger
        else False
    )
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if trainer.world_size != world_size(cfg.trainer):
        raise ConfigError(
            f"the trainer runs {trainer.world_size} processes, the step plan counted {world_size(cfg.trainer)}; "
            "set trainer.devices (and trainer.num_nodes) explicitly"
        )
    start_run(run_dir, rank=trainer.global_rank)  # every check passed: .hydra/ and the log file
    if trainer.global_rank == 0:
        record_resume(run_dir, resumed)
    for each in trainer.loggers:
        each.log_hyperparams(resolved)  # the whole resolved config (W&B: the run's config), not only overrides
    if trainer.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    fit(trainer, module, datamodule, ckpt_path, run_dir)
    if not isinstance(trainer.checkpoint_callback, RunCheckpoint):  # RunCheckpoint wrote it at the last step
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    stop = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal) and c.stopped), None)
    if isinstance(stop, SlurmRequeue):  # not finished: the requeued job continues it
        if trainer.is_global_zero:
            SlurmRequeue.requeue()
        return run_dir
    if stop is not None:  # not finished, and the exit code says so (a scheduler must not record success)
        log.warning(
            "stopped by %s at step %d; %s holds it: continue with resume=auto",
            stop.signum.name,
            trainer.global_step,
            run_dir / "checkpoints" / "last.ckpt",
        )
        raise SystemExit(stop.exit_code)
    module.save_result(run_dir)
    return run_dir


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule, ckpt_path: str | None, run_dir: Path) -> None:
    """`trainer.fit`, with a run of non-finite steps reported as one line naming the last good checkpoint."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteStreak as error:
        where = last_good_checkpoint(run_dir / "checkpoints", error.since)
        raise NonFiniteStreak(f"{error}; {where}", since=error.since) from None
    except SIGTERMException:  # Lightning's own handler, before the run installed its own: stopped, not finished
        log.warning("stopped by SIGTERM before the first step ended: no checkpoint was written")
        raise SystemExit(128 + signal.SIGTERM) from None


def last_good_checkpoint(directory: Path, before_step: int) -> str:
    """Where to resume a run whose steps went bad after `before_step`: its newest periodic checkpoint up to there."""
    steps = sorted((int(p.stem[len("step") :]), p) for p in directory.glob("step*.ckpt") if p.stem[4:].isdigit())
    good = [path for step, path in steps if step <= before_step]
    if not good:
        return f"no checkpoint had been written when they began (after step {before_step}): start again"
    return f"the last checkpoint before they began: resume={good[-1]}"
