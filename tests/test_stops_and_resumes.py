"""Stops that tell the truth and resumes that check what they continue.

- SIGTERM (scancel, preemption, eviction) stops a run at a step boundary with `last.ckpt` and exit code 143, and
  `resume=auto` finishes it bit-identical to a run that never stopped;
- a run of non-finite steps ends in one line naming the last good checkpoint, which stays intact;
- a resume is compared with the config its checkpoint was trained with: what cannot continue is refused
  (tests/test_user_errors.py runs those through the CLI), what may change is accepted and recorded.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_train, quick_overrides
from tests.helpers import run_tree
from unilip.errors import ConfigError, UserError
from unilip.training.resume import ALLOWED, CHECKPOINT_KEY, NOT_COMPARED, _flatten, check_resume, compare

REPO = Path(__file__).resolve().parents[1]

# Six steps at 56 px, a checkpoint every 2, validation every 3: small, and every part of the state in play.
SHORT = [
    "stage=1",
    "stages.stage1.max_steps=6",
    "stages.stage1.image_size=56",
    "data.batch_size=2",
    "data.train_batches_per_epoch=3",
    "loss.perceptual_weight=0",
    "checkpoint_every=2",
]


NO_VALIDATION = ["trainer.check_val_every_n_epoch=1000"]


def _train(photos_dir: Path, run_dir: Path, *extra: str) -> Path:
    from unilip.training.run import train

    return train(compose_train(quick_overrides(photos_dir, run_dir, *SHORT, *extra)))


def _checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def _survive(signum, frame) -> None:
    """Stands in for the default SIGTERM action (which would end pytest) while a test signals its own process."""


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_exit_code_143(photos_dir, tmp_path):
    """In-process and quick (the slow test below sends it from outside and resumes exactly)."""
    stopped = tmp_path / "stopped"
    signal_at = ["+callbacks.term._target_=tests.helpers.SignalAtStep", "+callbacks.term.step=3"]
    previous = signal.signal(signal.SIGTERM, _survive)
    try:
        with pytest.raises(SystemExit) as stop:
            _train(photos_dir, stopped, *NO_VALIDATION, *signal_at)
        assert signal.getsignal(signal.SIGTERM) is _survive  # the handler the process had is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 143  # 128 + SIGTERM: a scheduler records a stopped job, not a finished one
    # the signal came after step 3's check: step 4 finishes, then the run stops with its checkpoint and no result
    assert _checkpoint(stopped)["global_step"] == 4 and not (stopped / "tokenizer").exists()


def _command(photos_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = quick_overrides(photos_dir, run_dir, *SHORT, "stages.stage1.max_steps=12", *extra)
    overrides = [o for o in overrides if not o.startswith("run_dir=")]
    return [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]


def _env() -> dict[str, str]:
    # one thread per process: several processes x two threads on two cores wait on each other
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }


def _terminate_after(command: list[str], started: Path, timeout: float = 600) -> tuple[int, str]:
    """Start `command`, send SIGTERM to its (main) process once `started` exists; (exit code, stderr)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # from outside, as a scheduler sends it
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stderr.decode()


@pytest.mark.slow
def test_sigterm_from_outside_stops_a_real_process_with_143_and_it_resumes_exactly(photos_dir, tmp_path):
    """The scheduler's way: SIGTERM from another process to a running train.py; then the same command again."""
    straight, stopped, started = tmp_path / "straight", tmp_path / "stopped", tmp_path / "started"
    assert run_tree(_command(photos_dir, straight), cwd=REPO, env=_env(), timeout=600).returncode == 0
    touch = ["+callbacks.touch._target_=tests.helpers.TouchAtStep", "+callbacks.touch.step=3"]
    command = _command(photos_dir, stopped, "resume=auto", *touch, f"+callbacks.touch.path={started}")
    code, stderr = _terminate_after(command, started)
    assert code == 143 and "Traceback" not in stderr, stderr[-3000:]
    stopped_at = _checkpoint(stopped)["global_step"]
    assert 3 <= stopped_at < 12 and not (stopped / "tokenizer").exists()
    result = run_tree(command, cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _checkpoint(straight)["state_dict"], _checkpoint(stopped)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (stopped / "tokenizer" / "model.safetensors").exists()
    (record,) = [json.loads(line) for line in (stopped / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == stopped_at and record["changes"] == {}  # the same command: nothing changed


@pytest.mark.slow
def test_sigterm_to_one_rank_of_a_ddp_run_stops_every_rank(photos_dir, tmp_path):
    """Rank 0 alone gets the signal (a `kill` of the launching process): the ranks agree after a step, both stop,
    `last.ckpt` is written and the job exits 143 (Lightning's handler would forward it and exit 0)."""
    run, started = tmp_path / "run", tmp_path / "started"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
    touch = ["+callbacks.touch._target_=tests.helpers.TouchAtStep", "+callbacks.touch.step=3"]
    command = _command(photos_dir, run, *ddp, *touch, f"+callbacks.touch.path={started}")
    code, stderr = _terminate_after(command, started, timeout=300)  # a rank that did not stop: a hang, a timeout
    assert code == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert 3 <= _checkpoint(run)["global_step"] < 12 and not (run / "tokenizer").exists()


# ------------------------------------------------------------------ non-finite steps
@pytest.mark.slow
def test_a_run_of_non_finite_steps_is_one_line_naming_the_last_good_checkpoint(photos_dir, tmp_path):
    run = tmp_path / "run"
    overrides = quick_overrides(photos_dir, run, *SHORT, "stages.stage1.max_steps=20", "module.max_nonfinite_streak=3")
    overrides = [o for o in overrides if not o.startswith("run_dir=")]
    nan = ["+callbacks.nan._target_=tests.helpers.NonFiniteGradientFrom", "+callbacks.nan.batch=4"]
    command = [sys.executable, str(REPO / "train.py"), *overrides, *nan, f"hydra.run.dir={run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("UNILIP_TRACEBACK", None)
    result = run_tree(command, cwd=REPO, env=env, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    # steps 1-4 good (checkpoints at 2 and 4), then every gradient NaN: three skipped batches in a row
    good = run / "checkpoints" / "step0000004.ckpt"
    assert len(errors) == 1 and "not finite for 3 steps in a row" in errors[0], result.stderr[-3000:]
    assert errors[0].endswith(f"the last checkpoint before they began: resume={good}")
    assert _checkpoint(run, good.name)["global_step"] == 4  # what was computed is kept, and loads
    assert "non-finite loss or gradients" in (run / "train.log").read_text()  # the run keeps its log


def test_the_streak_error_is_a_users_error_and_says_when_no_checkpoint_was_written():
    from unilip.training.nonfinite import NonFiniteGuard, NonFiniteStreak
    from unilip.training.run import last_good_checkpoint

    guard = NonFiniteGuard(max_streak=2)
    guard.count(torch.tensor(1.0), step=10, check=False)
    with pytest.raises(NonFiniteStreak) as synced:  # skipped steps do not count: step 10 was the last good one
        guard.skip_now(torch.tensor(1.0), sync_free=False, step=10)
    assert isinstance(synced.value, UserError) and synced.value.since == 10
    with pytest.raises(NonFiniteStreak) as sync_free:  # skipped inside the optimizer: they counted as steps
        guard.count(torch.tensor(1.0), step=13, check=True)
    assert sync_free.value.since == 13 - 3
    assert "no checkpoint had been written when they began (after step 10)" in last_good_checkpoint(Path("/none"), 10)


# ------------------------------------------------------------------ what a resume may change
def test_a_resume_with_allowed_changes_continues_and_is_recorded(photos_dir, tmp_path):
    run = tmp_path / "run"
    _train(photos_dir, run, *NO_VALIDATION, "stages.stage1.max_steps=2")
    before = _checkpoint(run)[CHECKPOINT_KEY]
    assert before["world_size"] == 1 and before["config"]["recipe"]["max_steps"] == 2
    longer = ["stages.stage1.max_steps=4", "checkpoint_every=1", "trainer.log_every_n_steps=2", "resume=auto"]
    _train(photos_dir, run, *NO_VALIDATION, *longer)
    assert _checkpoint(run)["global_step"] == 4 and _checkpoint(run)[CHECKPOINT_KEY]["config"]["checkpoint_every"] == 1
    (record,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["compared_with"] == "checkpoint's config record"
    assert record["changes"] == {
        "callbacks.checkpoint.every_n_train_steps": [2, 1],
        "checkpoint_every": [2, 1],
        "module.max_steps": [2, 4],
        "recipe.max_steps": [2, 4],
        "trainer.log_every_n_steps": [1, 2],
        "trainer.max_steps": [2, 4],
    }
    assert OmegaConf.load(run / "config.yaml").trainer.max_steps == 4  # config.yaml: what the run now uses


def _resolved(*overrides: str) -> dict:
    cfg = compose_train(["run_dir=/runs/a", "paths.runs_dir=/runs", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_comparison_looks_at_what_is_computed_not_at_where_the_code_lives():
    stored = _resolved("experiment=quickstart")
    moved = _resolved("experiment=quickstart", "module._target_=unilip.tasks.tokenizer.TokenizerTraining")
    moved["run_dir"] = "/elsewhere/a"  # the run folder moved
    moved["stages"]["stage2"]["max_steps"] = 7  # another stage's recipe: not this run's
    refused, allowed = compare(stored, moved)
    assert refused == {} and allowed == {"run_dir": ["/runs/a", "/elsewhere/a"]}
    refused, _ = compare(stored, _resolved("experiment=quickstart", "model=tiny_dinov2"))
    assert refused["model.config.encoder"] == ["internvit", "dinov2_with_registers"]
    refused, _ = compare(stored, _resolved("experiment=quickstart", "optim.optimizer.betas=[0.9,0.99]"))
    betas = [[0.9, 0.999], [0.9, 0.99]]
    assert refused == {"optim.optimizer.betas": betas, "module.optimizer.betas": betas}  # the module's copy too


def test_every_allowed_key_names_keys_the_configs_have():
    """The allow-list is written by hand: a pattern that no longer matches any key of any task's config (a renamed
    option) is caught here."""
    experiments = [
        ("tokenizer", "quickstart"),
        ("generate", "generate/quickstart"),
        ("generate", "generate/unilip_1b"),  # its stages are given in epochs
        ("unified", "unified/quickstart"),
    ]
    keys = set()
    for task, experiment in experiments:
        keys |= set(_flatten(_resolved(f"task={task}", f"experiment={experiment}")))
    unused = [pattern for pattern in [*ALLOWED, *NOT_COMPARED] if not fnmatch.filter(keys, pattern)]
    assert not unused, f"patterns that match no key of any task's config: {unused}"


def test_a_checkpoint_from_before_the_record_is_compared_with_its_runs_config_yaml(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 5, "state_dict": {}}, checkpoint)  # no config record: an older checkpoint
    cfg = compose_train(["run_dir=/runs/a", "experiment=quickstart"])
    with caplog.at_level(logging.WARNING):
        resume = check_resume(cfg, str(checkpoint), world_size=1)
    assert resume.step == 5 and resume.compared_with == "" and resume.changes == {}  # nothing to compare with
    assert "is not compared with it" in caplog.text
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose_train(["run_dir=/runs/a"]), resolve=True))
    with pytest.raises(ConfigError, match=r"data.batch_size x processes\): 16 \(16 x 1\) -> 8 \(8 x 1\)"):
        check_resume(cfg, str(checkpoint), world_size=1)  # the quick start's 8 per batch against the default 16
    resume = check_resume(compose_train(["run_dir=/runs/b"]), str(checkpoint), world_size=1)
    assert resume.compared_with == str(run / "config.yaml")
    moved = {"run_dir", "trainer.default_root_dir", "logger.save_dir", "module.sample_dir"}
    moved.add("callbacks.checkpoint.dirpath")
    assert set(resume.changes) == moved and resume.changes["run_dir"] == ["/runs/a", "/runs/b"]  # the run moved


def test_the_global_batch_may_be_spread_over_other_hardware_but_not_changed(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    stored = _resolved("data.batch_size=16", "trainer.devices=4")
    torch.save({"global_step": 9, CHECKPOINT_KEY: {"config": stored, "world_size": 4}}, checkpoint)
    eight = compose_train(["run_dir=/runs/a", "paths.runs_dir=/runs", "data.batch_size=8", "trainer.devices=8"])
    resume = check_resume(eight, str(checkpoint), world_size=8)  # 16 x 4 = 8 x 8: the same global batch
    assert resume.changes == {"data.batch_size": [16, 8], "trainer.devices": [4, 8]}
    same_batch = compose_train(["run_dir=/runs/a", "paths.runs_dir=/runs", "data.batch_size=16", "trainer.devices=8"])
    with pytest.raises(ConfigError, match=r"global batch \(data.batch_size x processes\): 64 \(16 x 4\) -> 128"):
        check_resume(same_batch, str(checkpoint), world_size=8)


def test_a_sharded_checkpoint_is_resumed_only_by_a_sharded_strategy(tmp_path):
    """FSDP2 checkpoints are directories of shards (Lightning keeps the rest in meta.pt): DDP cannot read one."""
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.mkdir()
    fsdp = ["run_dir=/runs/a", "paths.runs_dir=/runs", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]
    torch.save(
        {"global_step": 3, CHECKPOINT_KEY: {"config": _resolved(*fsdp[2:]), "world_size": 2}}, checkpoint / "meta.pt"
    )
    assert check_resume(compose_train(fsdp), str(checkpoint), world_size=2).step == 3
    ddp = compose_train([*fsdp, "trainer=ddp"])
    with pytest.raises(ConfigError, match=r"trainer.strategy: FSDP2 \(a sharded checkpoint directory\) -> "):
        check_resume(ddp, str(checkpoint), world_size=2)
