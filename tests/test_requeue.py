"""Stopping on a signal, in one process without a Trainer (the real runs, with real signals from outside, are
in test_stops_and_resumes.py and test_scale_processes.py): the handler only sets a flag, the stop comes at a
checked step boundary, the exit code is the signal's, the previous handler comes back, and the SLURM requeue
asks `scontrol` for the right job."""

import logging
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from unilip.training.requeue import SlurmRequeue, StopOnSignal

SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "unilip", "SLURM_JOB_ID": "4242"}


def _trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, should_stop=False)


MODULE = SimpleNamespace(device=torch.device("cpu"))


class Unhandled(Exception):
    pass


def _unhandled(signum, frame):
    raise Unhandled(f"signal {signum} reached the handler the callback should have replaced")


@pytest.fixture
def restore_usr1():
    """SIGUSR1's default action would end pytest: a handler that fails the test stands in for it."""
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGUSR1, _unhandled)
    yield
    signal.signal(signal.SIGUSR1, before[0])
    signal.signal(signal.SIGTERM, before[1])


def test_a_signal_stops_at_the_next_checked_step_with_the_signals_exit_code(restore_usr1, caplog):
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopOnSignal("SIGUSR1", check_every=3)
    assert stop.exit_code == 128 + 10  # as if SIGUSR1 had ended the process
    assert StopOnSignal().exit_code == 143 and StopOnSignal().check_every == 1  # SIGTERM, every step
    stop.on_train_start(_trainer(0), MODULE)
    trainer = _trainer(1)
    stop.on_train_batch_end(trainer, MODULE)
    assert not trainer.should_stop and not stop.stopped  # no signal yet
    os.kill(os.getpid(), signal.SIGUSR1)  # handled here: only a flag, no exception
    assert stop.received and not stop.stopped
    for step in (4, 5):  # not a multiple of check_every: not looked at
        trainer = _trainer(step)
        stop.on_train_batch_end(trainer, MODULE)
        assert not trainer.should_stop
    trainer = _trainer(6)
    with caplog.at_level(logging.INFO, logger="unilip.training.requeue"):
        stop.on_train_batch_end(trainer, MODULE)
    assert trainer.should_stop and stop.stopped
    assert [r.getMessage() for r in caplog.records] == ["SIGUSR1 at step 6: stopping to checkpoint"]
    stop.on_train_start(_trainer(6), MODULE)  # installed once: the previous handler is still the one kept
    stop.teardown(trainer, MODULE, "fit")
    assert signal.getsignal(signal.SIGUSR1) == previous
    stop.on_train_start(_trainer(0), MODULE)  # the same callback in a second fit installs itself again
    assert signal.getsignal(signal.SIGUSR1) == stop._on_signal
    stop.teardown(trainer, MODULE, "fit")
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_teardown_leaves_a_handler_someone_else_installed_since(restore_usr1):
    stop = StopOnSignal("SIGUSR1")
    stop.on_train_start(_trainer(0), MODULE)

    def other(signum, frame):
        pass

    signal.signal(signal.SIGUSR1, other)
    stop.teardown(_trainer(0), MODULE, "fit")
    assert signal.getsignal(signal.SIGUSR1) is other


def test_a_signal_on_one_rank_stops_every_rank():
    """The flag goes through an all-reduce (one rank here): a rank that saw the signal makes the sum non-zero."""
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        stop = StopOnSignal("SIGUSR1")
        trainer = _trainer(1)
        stop.on_train_batch_end(trainer, MODULE)
        assert not trainer.should_stop
        stop.received = True
        stop.on_train_batch_end(trainer, MODULE)
        assert trainer.should_stop and stop.stopped
    finally:
        torch.distributed.destroy_process_group()


def test_the_slurm_handler_is_installed_at_setup_only_under_slurm(monkeypatch, restore_usr1):
    previous = signal.getsignal(signal.SIGUSR1)
    requeue = SlurmRequeue()
    assert (requeue.signum, requeue.check_every) == (signal.SIGUSR1, 10)
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    requeue.setup(_trainer(0), MODULE, "fit")
    requeue.on_train_start(_trainer(0), MODULE)  # outside SLURM the signal means nothing
    assert signal.getsignal(signal.SIGUSR1) == previous
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    requeue.setup(_trainer(0), MODULE, "validate")
    assert signal.getsignal(signal.SIGUSR1) == previous
    requeue.setup(_trainer(0), MODULE, "fit")
    assert signal.getsignal(signal.SIGUSR1) == requeue._on_signal
    requeue.teardown(_trainer(0), MODULE, "fit")
    assert signal.getsignal(signal.SIGUSR1) == previous


@pytest.mark.parametrize(
    ("environ", "job"), [({"SLURM_JOB_ID": "4242"}, "4242"), ({"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3",
                                                                "SLURM_JOB_ID": "4245"}, "77_3")]
)  # fmt: skip
def test_requeue_names_the_job_or_the_array_task(environ, job, tmp_path, monkeypatch, caplog):
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="unilip.training.requeue"):
        SlurmRequeue.requeue()
    assert calls.read_text().split() == ["requeue", job]
    message = f"requeued SLURM job {job}; it continues from the checkpoint with resume=auto"
    assert [r.getMessage() for r in caplog.records] == [message]
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unilip.training.requeue"):
        SlurmRequeue.requeue()
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and failed[0].getMessage() == f"scontrol requeue {job} failed (1): Invalid job id"
