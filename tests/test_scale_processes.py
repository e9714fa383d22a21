"""More ranks than validation samples, SLURM requeue and torchrun restarts, with real processes (gloo, CPU).

Every run here is a subprocess with a timeout: a hang fails the test, not the CI run.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600
# Weights that cannot move (updates of ~1e-30 vanish in fp32): validation then depends only on the
# initial weights and the samples, so any number of processes must report the same numbers.
FROZEN_LR = ["optim.lr=1e-30", "optim.final_lr=1e-30", "optim.discriminator_lr=1e-30"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def _env(**extra: str) -> dict[str, str]:
    # one thread per process: several processes x two threads on two cores wait on each other
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _command(script: str, data_root: Path, run_dir: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> list:
    return [
        sys.executable,
        *launcher,
        str(REPO / script),
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]


def _run(command: list, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = run_tree(command, cwd=REPO, env=env or _env(), timeout=TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(f"{command[1:3]} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


TOKENIZER = [
    "experiment=quickstart",
    "data.num_workers=0",
    "data.val_num_workers=0",
    "data.pin_memory=false",
    "loss.perceptual_weight=0",
    "trainer.log_every_n_steps=1",
    "data.batch_size=2",
    "stages.stage2.image_size=56",
    "stages.stage1.image_size=56",
]


def _last(run_dir: Path, key: str) -> float:
    with open(run_dir / "logs" / "metrics.csv") as file:
        return [float(row[key]) for row in csv.DictReader(file) if row.get(key)][-1]


def _logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "logs" / "metrics.csv") as file:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(file) if row.get(key)]


@pytest.fixture(scope="module")
def few_val(photos_dir, tmp_path_factory):
    """Two-sample validation shards: two photos, and one captioned photo + one edit triplet."""
    from unilip.data.shards import ShardSink, SkipCounter, read_shard

    root = tmp_path_factory.mktemp("few_val")

    def first(url: Path, count: int) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "__url__"} for s in read_shard(str(url), SkipCounter())][:count]

    photos = photos_dir / "photos"
    for name, samples in {
        "photos": first(photos / "val-000000.tar", 2),
        "mixed": first(photos / "val-000000.tar", 1) + first(photos / "edit-val-000000.tar", 1),
    }.items():
        with ShardSink(root / name, "val") as sink:
            for sample in samples:
                sink.write(sample)
    return {name: str(root / name / "val-000000.tar") for name in ("photos", "mixed")}


def test_tokenizer_with_more_ranks_than_validation_images(photos_dir, few_val, tokenizer_dir, tmp_path):
    """3 ranks, 2 validation images: the run finishes (it hung at the first validation), validation equals
    one process's, DDP searches no unused parameters, and gradients match their bucket layout."""
    common = [
        *TOKENIZER,
        "stage=2",
        f"init_from={tokenizer_dir}",
        "stages.stage2.max_steps=3",
        "stages.stage2.gan_start_step=0",  # the discriminator, outside DDP, is in play
        "data.train_batches_per_epoch=3",
        f"data.val_urls={few_val['photos']}",
        *FROZEN_LR,
    ]
    one = tmp_path / "one"
    _run(_command("train.py", photos_dir, one, *common, f"paths.runs_dir={tmp_path}", "trainer=cpu"))
    three = tmp_path / "three"
    report = tmp_path / "layout.json"
    started = time.perf_counter()
    result = _run(
        _command(
            "train.py",
            photos_dir,
            three,
            *common,
            f"paths.runs_dir={tmp_path}",
            *DDP,
            "trainer.devices=3",
            "+callbacks.layout._target_=tests.helpers.GradientLayoutReport",
            f"+callbacks.layout.out={report}",
        )
    )
    print(f"3-process tokenizer run: {time.perf_counter() - started:.1f} s")
    for key in ("val/psnr", "val/ssim", "val/teacher_cosine"):
        assert _last(three, key) == pytest.approx(_last(one, key), rel=1e-5, abs=1e-5), key
    assert "find_unused_parameters=True" not in result.stderr
    layout = json.loads(report.read_text())
    assert layout["checked"] > 0 and layout["mismatched"] == {}


def test_generation_with_more_ranks_than_validation_samples(photos_dir, few_val, tokenizer_dir, tmp_path):
    """3 ranks, 2 validation samples (a caption and an edit): the generation module finishes and its
    fixed-timestep validation loss equals one process's (noise is seeded per sample, not per batch)."""
    common = [
        "experiment=generate/quickstart",
        "stage=1",
        f"tokenizer_from={tokenizer_dir}",
        f"paths.runs_dir={tmp_path}",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "data.pin_memory=false",
        "data.batch_size=2",
        "trainer.log_every_n_steps=1",
        "module.sample_steps=2",
        "stages.stage1.max_steps=2",
        "data.train_batches_per_epoch=2",
        f"data.val_urls={few_val['mixed']}",
        "optim.lr=1e-30",
        "optim.final_lr=1e-30",
    ]
    one, three = tmp_path / "one", tmp_path / "three"
    _run(_command("train.py", photos_dir, one, *common, "name=one", "trainer=cpu"))
    started = time.perf_counter()
    _run(_command("train.py", photos_dir, three, *common, "name=three", *DDP, "trainer.devices=3"))
    print(f"3-process generation run: {time.perf_counter() - started:.1f} s")
    assert _last(three, "val/flow_loss") == pytest.approx(_last(one, "val/flow_loss"), rel=1e-5)
    assert list((three / "samples").glob("generation_step*.png"))  # rank 0 sampled its grid


def test_eval_with_more_ranks_than_images(photos_dir, few_val, tokenizer_dir, tmp_path):
    common = [f"ckpt={tokenizer_dir}", f"data.val_urls={few_val['photos']}", "data.val_num_workers=0", "batch_size=4"]
    _run(_command("eval.py", photos_dir, tmp_path / "one", *common, "trainer=cpu"))
    _run(_command("eval.py", photos_dir, tmp_path / "three", *common, *DDP, "trainer.devices=3"))
    one, three = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "three"))
    assert [r["key"] for r in three["per_image"]] == [r["key"] for r in one["per_image"]] and len(one["per_image"]) == 2
    for a, b in zip(one["per_image"], three["per_image"], strict=True):
        assert b["psnr"] == pytest.approx(a["psnr"], abs=1e-4) and b["ssim"] == pytest.approx(a["ssim"], abs=1e-5)


# Stage 1, 8 steps, checkpoint every 2: the uninterrupted run both interrupted runs must equal.
RESUMABLE = [
    *TOKENIZER,
    "stage=1",
    "stages.stage1.max_steps=8",
    "checkpoint_every=2",
    "data.train_batches_per_epoch=4",
]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def straight(photos_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    _run(_command("train.py", photos_dir, run_dir, *RESUMABLE, f"paths.runs_dir={run_dir.parent}"))
    return run_dir


def _one_task_slurm_job(job_id: str, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment SLURM gives a one-task job, with a stand-in `scontrol` on the PATH that records its
    arguments in the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "unilip",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    return slurm, calls


def test_slurm_requeue_checkpoints_requeues_and_resumes_exactly(photos_dir, straight, tmp_path):
    """SIGUSR1 (SLURM's `--signal=USR1@...`) to a running job: it stops after a step, writes last.ckpt, calls
    `scontrol requeue <job id>` and exits without a result; `resume=auto` then finishes the run exactly as
    the uninterrupted one."""
    slurm, calls = _one_task_slurm_job("4242", tmp_path)
    run_dir = tmp_path / "requeued"
    started = tmp_path / "started"
    command = _command(
        "train.py",
        photos_dir,
        run_dir,
        *RESUMABLE,
        f"paths.runs_dir={tmp_path}",
        "resume=auto",
        "callbacks.requeue.check_every=1",
        "+callbacks.touch._target_=tests.helpers.TouchAtStep",
        "+callbacks.touch.step=3",
        f"+callbacks.touch.path={started}",
    )
    process = subprocess.Popen(command, cwd=REPO, env=_env(**slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)  # from outside, as SLURM sends it
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 8 and not (run_dir / "tokenizer").exists()  # stopped early, no result written

    _run(command, env=_env(**slurm))  # the requeued job: same command, resume=auto
    a, b = _weights(straight), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run_dir / "tokenizer" / "model.safetensors").exists()
    assert _logged(run_dir, "loss/total") == _logged(straight, "loss/total")


@pytest.mark.slow
@pytest.mark.parametrize("every", [1000, 2])
def test_slurm_requeue_writes_its_own_checkpoint_between_periodic_ones(photos_dir, straight, every, tmp_path):
    """SIGUSR1 during step 3 must leave last.ckpt at step 3, and the requeued job resumes from it (its resume
    record says step 3) and finishes as the uninterrupted run. checkpoint_every=1000: no periodic checkpoint
    at all (a requeue that wrote none would lose every step since the start); checkpoint_every=2: the periodic
    one at step 2 must not stand in for it (Lightning's own save at the end of fit writes last.ckpt only when
    no checkpoint was written before, so only this case sees the requeue's own save go missing)."""
    slurm, calls = _one_task_slurm_job("4343", tmp_path)
    run_dir = tmp_path / "requeued"
    settings = [o for o in RESUMABLE if not o.startswith("checkpoint_every=")]
    command = _command(
        "train.py",
        photos_dir,
        run_dir,
        *settings,
        f"checkpoint_every={every}",
        f"paths.runs_dir={tmp_path}",
        "resume=auto",
        "callbacks.requeue.check_every=1",
        "+callbacks.signal._target_=tests.helpers.SignalDuringStep",
        "+callbacks.signal.step=3",
    )
    _run(command, env=_env(**slurm))  # stops after step 3, requeues, exits 0
    assert calls.read_text().split() == ["requeue", "4343"]
    checkpoints = run_dir / "checkpoints"
    periodic = [f"step{step:07d}.ckpt" for step in range(every, 3, every)]
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", *periodic]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (run_dir / "tokenizer").exists()

    _run(command, env=_env(**slurm))  # the requeued job: same command; the signal callback is past its step
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in resumes] == [3]
    a, b = _weights(straight), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(run_dir, "loss/total") == _logged(straight, "loss/total")


def test_torchrun_restarts_a_killed_rank_and_continues_from_the_last_checkpoint(photos_dir, tmp_path):
    """`torchrun --max-restarts 2`, rank 1 SIGKILLed after the step-4 checkpoint in the first attempt: torchrun
    restarts both ranks, which resume from that checkpoint (resume=auto) and finish as an uninterrupted run."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    common = [*RESUMABLE, *DDP, "trainer.devices=2", "resume=auto", f"paths.runs_dir={tmp_path}"]
    straight = tmp_path / "straight"
    # restarts allowed in both: on a loaded machine gloo's first connection can time out, and a restart
    # of either run with resume=auto must not change its result anyway
    _run(_command("train.py", photos_dir, straight, *common, launcher=(*launcher, "--max-restarts", "2")))
    restarted = tmp_path / "restarted"
    kill = ["+callbacks.kill._target_=tests.helpers.KillRankInFirstAttempt", "+callbacks.kill.step=4"]
    result = _run(
        _command("train.py", photos_dir, restarted, *common, *kill, launcher=(*launcher, "--max-restarts", "2"))
    )
    assert "restart" in result.stderr.lower()  # torchrun's agent reports the restart
    a, b = _weights(straight), _weights(restarted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(restarted, "loss/total") == _logged(straight, "loss/total")


@pytest.mark.slow
def test_torchrun_on_a_fresh_machine_builds_the_photos_once_while_the_other_rank_waits(tmp_path):
    """torchrun starts both ranks at once, with no data folder: local rank 0 builds the bundled photos before the
    step plan counts them, rank 1 waits for them (it would stop with "no shard matches" otherwise)."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    data, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = [*TOKENIZER, *DDP, "trainer.devices=2", "stage=1", "stages.stage1.max_steps=2", "checkpoint_every=2"]
    result = _run(_command("train.py", data, run_dir, *overrides, f"paths.runs_dir={tmp_path}", launcher=launcher))
    output = result.stdout + result.stderr
    assert output.count("building the bundled photo shards") == 1, output[-3000:]
    assert (data / "photos" / "manifest.json").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in data.iterdir()) == ["photos"]  # no building folder left behind
