"""Writing a run's checkpoints, and reading what a run left behind: its saved result, or a Lightning
checkpoint (one file, or a directory of shards under FSDP2), with the EMA weights in place of the raw
ones they average."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unilip.models.hub import load_torch_file
from unilip.training.config import ConfigError


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes `last.ckpt` after the run's final step: when
    `max_steps` is reached or a callback stopped the run (a SLURM requeue, say).

    Saved from `on_train_batch_end`, where Lightning's periodic checkpoints are saved and where its
    resume logic expects them: a checkpoint written after `fit` returns, at an epoch boundary,
    resumes with the logged step numbers shifted by one. Lightning runs checkpoint callbacks after
    all others, so a stop requested in the same step is seen here.

    `last.ckpt` is always the newest state, the file `resume=auto` reads: Lightning would write `last-v1.ckpt`
    beside an existing `last.ckpt` whenever it cannot restore this callback's own state (its key holds the
    checkpoint interval, which a resume may change), so the version counter is off.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ending = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if ending and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class BesideTargetCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file beside the checkpoint instead of in $TMPDIR.

    Lightning's own (fsspec's transaction) writes a local checkpoint to `tempfile.mkstemp()` and then
    `shutil.move`s it: a kill during the write leaves a full-size orphan in $TMPDIR, and where $TMPDIR is
    another filesystem (a node's local disk under a cluster's shared one) the move is a copy, so a kill
    during it leaves a truncated checkpoint under the real name. Here the file is written as
    `.<name>.partial` next to the target, flushed to disk, then renamed over it (`os.replace`: atomic on one
    filesystem); a failed write removes it, and one a kill left behind is replaced by the next write of that
    name (a resumed run passes the same step again). Remote paths (s3://, ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        protocols = get_filesystem(path).protocol  # fsspec's: "file" (and "local") for a local path
        if storage_options is not None or "file" not in (protocols if isinstance(protocols, tuple) else (protocols,)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the rename makes it the checkpoint
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def locate(path: str | Path, result: str) -> Path:
    """A run directory -> its saved result (`<run>/<result>/config.json`, a finished run) or its last
    checkpoint; any other path unchanged."""
    path = Path(path)
    if (path / result / "config.json").exists():
        return path / result
    if (path / "checkpoints" / "last.ckpt").exists():
        return path / "checkpoints" / "last.ckpt"
    return path


def read_checkpoint(path: Path, task: str) -> dict[str, Any] | None:
    """`path` as a unilip Lightning checkpoint of `task` (read with weights_only=True); None if it is not a
    checkpoint at all, a ConfigError if it is another task's."""
    if path.is_file() and path.suffix == ".ckpt":
        checkpoint = load_torch_file(path, what="checkpoint", mmap=True)
    elif path.is_dir() and (path / ".metadata").exists():
        from unilip.training.distributed import load_sharded_checkpoint

        checkpoint = load_sharded_checkpoint(path)
    else:
        return None
    found = checkpoint.get("unilip", {}).get("task") if isinstance(checkpoint, dict) else None
    if found != task:
        raise ConfigError(f"{path} is a {found or 'foreign'} checkpoint, not a unilip {task} one")
    return checkpoint


def ema_state(state_dict: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """A training module's state dict -> the weights of its `module` (e.g. "tokenizer"), the EMA
    replacing what it averages."""
    prefix = f"{module}."
    weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for key, value in state_dict.items():
        if key.startswith("ema.") and key != "ema.num_updates":
            weights[key[len("ema.") :].replace("__", ".")] = value
    return weights
