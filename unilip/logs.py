"""Keep the console about the run: drop third-party advertising and deprecation chatter we cannot act on."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party_noise() -> None:
    """Filter Lightning's product tips and deprecation warnings raised inside libraries, not by our calls."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning internals
    warnings.filterwarnings("ignore", message=r".*parameter 'pretrained' is deprecated.*")  # lpips -> torchvision
    warnings.filterwarnings("ignore", message=r".*Arguments other than a weight enum.*")  # lpips -> torchvision
    # Lightning's advice for manual optimisation; our checkpoints are meant to hold the state after
    # the step they are named after (resume is tested to be exact).
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    # The generation module moves its own batches on purpose (edit flags stay on the host).
    warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device` in `LightningModule`.*")
    # The modules turn uint8 images into floats on the device, whatever data module feeds them.
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")
    # `import lightning` gives its logger a console handler of its own; where the application has
    # configured logging (Hydra's handlers on the root logger), every Lightning line would print twice.
    if logging.getLogger().handlers:
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            lightning.removeHandler(handler)


CLI_FORMAT = "%(levelname)s %(name)s: %(message)s"


def cli_logging(level: int = logging.INFO, fmt: str = CLI_FORMAT) -> None:
    """For command-line tools: progress and diagnostics on stderr, one `LEVEL logger: message` line each
    (a no-op where the application has configured logging already, as Hydra does)."""
    logging.basicConfig(level=level, format=fmt)


class _Stdout(logging.StreamHandler):
    """A handler on whatever `sys.stdout` is when a record is written (a test's capture, a redirection made
    after the logger was set up), not the stream of the moment it was created."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def output(name: str) -> logging.Logger:
    """A command-line tool's results, the lines a user or a script reads (a JSON record, a summary, the URL
    of a server), written to stdout as the bare message. Diagnostics stay on stderr (`cli_logging`), so
    `tool > result.json` captures the result alone; a library caller can silence or redirect these lines
    through `logging.getLogger(f"{name}.output")` like any other logger."""
    logger = logging.getLogger(f"{name}.output")
    if not any(isinstance(handler, _Stdout) for handler in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def is_logging_step(trainer) -> bool:
    """Whether Lightning writes this training step's `self.log(..., on_step=True)` values to the loggers
    (every `log_every_n_steps`). Each `self.log` call costs Lightning ~0.1-0.5 ms of bookkeeping, so the
    modules call it only on these steps: a few ms per step saved on the others."""
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs)


@contextmanager
def one_line_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """For command-line tools: a user's mistake (a missing path, an unreadable image, weights that do not
    fit: `unilip.errors.USER_ERRORS` and any `kinds` given) ends the program with its message on one line
    instead of a traceback. UNILIP_TRACEBACK=1 shows the traceback."""
    from unilip.errors import USER_ERRORS, one_line

    try:
        yield
    except (*USER_ERRORS, *kinds) as error:
        if os.environ.get("UNILIP_TRACEBACK"):
            raise
        sys.exit(f"error: {one_line(error)}")
