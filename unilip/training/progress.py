"""The console progress bar of a training run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning_utilities.core.imports import RequirementCache


class StepLimitedRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, for runs that end at `max_steps` with no epoch limit (`max_epochs=-1`):
    the epoch reads "Epoch 3", where Lightning's own bar reads "Epoch 3/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs not in (None, -1):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # padded as Lightning pads it: no flicker


def progress_bar(enabled: bool = True) -> L.Callback:
    """The progress bar callback for `trainer.enable_progress_bar`; with it off, a callback that does nothing
    (Lightning refuses a progress bar callback when the trainer's bar is switched off)."""
    if not enabled:
        return L.Callback()
    return StepLimitedRichProgressBar() if RequirementCache("rich>=10.2.2") else TQDMProgressBar()
