"""train.py as users run it, in subprocesses: crash and resume, DDP, FSDP2, config errors, sweeps."""

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]


def run_train(data_root, run_dir, *overrides, check=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    flags = [o for o in overrides if o.startswith("-")]  # Hydra flags (-m) go before the overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *flags,
        "experiment=quickstart",
        f"paths.data_dir={data_root}",
        f"paths.runs_dir={run_dir.parent}",
        f"hydra.run.dir={run_dir}",
        "data.num_workers=1",
        "data.val_num_workers=0",
        "data.pin_memory=false",
        "loss.perceptual_weight=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    result = run_tree(command, cwd=REPO, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every row of the run's metrics.csv that has `key`."""
    import csv

    with open(run_dir / "logs" / "metrics.csv") as file:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(file) if row.get(key)]


def module_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


# GAN from step 4 so the discriminator, its optimizer groups and the LeCam buffers are all in play.
RESUME = [
    "stage=2",
    "stages.stage2.max_steps=12",
    "stages.stage2.gan_start_step=4",
    "checkpoint_every=6",
    "data.train_batches_per_epoch=5",
    "stages.stage2.image_size=56",
    "data.batch_size=4",
]


@pytest.fixture(scope="module")
def stage1_dir(photos_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "s1"
    run_train(
        photos_dir,
        run_dir,
        "stage=1",
        "stages.stage1.max_steps=4",
        "stages.stage1.image_size=56",
        "data.train_batches_per_epoch=4",
        "data.batch_size=4",
    )
    return run_dir


@pytest.mark.numerics
def test_kill_and_resume_is_bit_identical(photos_dir, stage1_dir, tmp_path):
    straight = tmp_path / "straight"
    run_train(photos_dir, straight, *RESUME, f"init_from={stage1_dir}")

    crashed = tmp_path / "crashed"
    killed = run_train(
        photos_dir,
        crashed,
        *RESUME,
        f"init_from={stage1_dir}",
        "+callbacks.kill._target_=tests.helpers.KillAfterCheckpoint",
        "+callbacks.kill.step=6",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: a real crash
    assert (crashed / "checkpoints" / "last.ckpt").exists() and not (crashed / "tokenizer").exists()
    refused = run_train(photos_dir, crashed, *RESUME, f"init_from={stage1_dir}", check=False)
    assert refused.returncode != 0 and "resume=auto" in refused.stderr.strip().splitlines()[-1]
    run_train(photos_dir, crashed, *RESUME, f"init_from={stage1_dir}", "resume=auto")

    a, b = module_state(straight / "checkpoints" / "last.ckpt"), module_state(crashed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("discriminator.") for k in a)
    assert any(k.startswith("lecam.") for k in a)
    assert not any("teacher" in k for k in a)  # the frozen teacher is rebuilt, not saved
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    # the metrics history survives the crash: every step once, the values of the uninterrupted run
    assert (
        _logged(crashed, "loss/total") == _logged(straight, "loss/total") and len(_logged(straight, "loss/total")) == 12
    )
    assert _logged(crashed, "val/psnr") == _logged(straight, "val/psnr") and _logged(straight, "val/psnr")
    opt_a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    opt_b = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_bad_configs_fail_with_one_clear_line(photos_dir, tmp_path):
    cases = {
        "stage=3": "stage=3 is not a tokenizer stage; use stage=1 (decoder alignment) or stage=2",
        "stage=2 init_from=null": "stage 2 needs init_from",
        "stages.stage1.image_size=250 model.config.pad_to_multiple=false": "not a multiple of 28",
        "init_from=/nonexistent": "init_from=/nonexistent does not exist",
    }
    for overrides, message in cases.items():
        result = run_train(photos_dir, tmp_path / "bad", *overrides.split(), check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr[
            -2000:
        ]
        assert "Traceback" not in result.stderr


def test_a_run_prints_each_line_once_and_writes_hydras_files_once_accepted(photos_dir, tmp_path):
    run = tmp_path / "run"
    small = ["stages.stage1.max_steps=2", "stages.stage1.image_size=56", "data.train_batches_per_epoch=2"]
    result = run_train(photos_dir, run, "stage=1", *small, "data.batch_size=2", "trainer.enable_progress_bar=true")
    output = result.stdout + result.stderr
    assert output.count("Seed set to 0") == 1 and output.count("`Trainer.fit` stopped") == 1  # not twice
    assert "Epoch 0" in output and "/-2" not in output  # the epoch without Lightning's "max_epochs - 1"
    assert "- stage=1" in (run / ".hydra" / "overrides.yaml").read_text()
    assert "stage: 1" in (run / ".hydra" / "config.yaml").read_text()
    assert "Seed set to 0" in (run / "train.log").read_text()  # logged before the run was accepted: kept


def _photo_tensor(photos_dir, path, count=16, size=56):
    """A fixed stack of real photo crops in [0, 1], as the DDP test's global batches."""
    from unilip.data import ShardDataModule

    data = ShardDataModule(
        val_urls=str(photos_dir / "photos" / "train-*.tar"),
        image_size=size,
        batch_size=count,
        num_workers=0,
        pin_memory=False,
    )
    data.setup("validate")
    images = next(iter(data.val_dataloader()))["image"][:count]
    torch.save(images.contiguous(), path)
    return path


def _fixed_data(images_file, global_batch, steps):
    return [
        "data._target_=tests.helpers.FixedGlobalBatches",
        f"+data.images_file={images_file}",
        f"+data.global_batch={global_batch}",
        f"+data.steps={steps}",
        "+trainer.use_distributed_sampler=false",
        "trainer.check_val_every_n_epoch=1000",
    ]


PARALLEL = [
    "stage=2",
    "stages.stage2.max_steps=6",
    "stages.stage2.gan_start_step=2",
    "stages.stage2.image_size=56",
    "checkpoint_every=3",
]


def test_ddp_two_processes_equal_one_process(photos_dir, stage1_dir, tmp_path):
    images = _photo_tensor(photos_dir, tmp_path / "images.pt")
    # SGD with momentum: updates are linear in the gradients, so the comparison measures the
    # gradient computation itself (Adam's g / sqrt(v) turns rounding in near-zero gradients into
    # sign flips of size lr, which says nothing about DDP).
    sgd = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "+optim.optimizer.momentum=0.9"]
    common = [*PARALLEL, f"init_from={stage1_dir}", *_fixed_data(images, 8, 6), *sgd]
    run_train(photos_dir, tmp_path / "one", *common, "trainer=cpu")
    run_train(
        photos_dir,
        tmp_path / "ddp",
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
    )
    one = module_state(tmp_path / "one" / "checkpoints" / "last.ckpt")
    ddp = module_state(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert one.keys() == ddp.keys()
    worst = max((one[k].float() - ddp[k].float()).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"DDP (2 processes) vs 1 process, max |difference| over all weights, EMA and buffers: {worst:.2e}")
    assert worst < 1e-5
    start = module_state(stage1_dir / "checkpoints" / "last.ckpt")
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k.startswith("tokenizer.decoder."))
    assert moved > 100 * worst  # the weights did train
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.log")) == ["train.log"]  # rank 1: console only


def test_fsdp2_two_processes_equal_one_process(photos_dir, stage1_dir, tmp_path):
    """FSDP2 shards parameters, gradients and optimizer state; the numbers must still be one process's."""
    images = _photo_tensor(photos_dir, tmp_path / "images.pt")
    sgd = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "+optim.optimizer.momentum=0.9"]
    common = [*PARALLEL, f"init_from={stage1_dir}", *_fixed_data(images, 8, 6), *sgd]
    run_train(photos_dir, tmp_path / "one", *common, "trainer=cpu")
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    run_train(photos_dir, tmp_path / "fsdp", *common, *fsdp)
    from unilip.training.distributed import load_sharded_checkpoint

    one = module_state(tmp_path / "one" / "checkpoints" / "last.ckpt")
    sharded = load_sharded_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")["state_dict"]
    assert one.keys() == sharded.keys()
    worst = max((one[k].float() - sharded[k].float()).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"FSDP2 (2 processes) vs 1 process, max |difference| over all weights, EMA and buffers: {worst:.2e}")
    assert worst < 1e-5
    start = module_state(stage1_dir / "checkpoints" / "last.ckpt")
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k.startswith("tokenizer.decoder."))
    assert moved > 100 * worst  # the weights did train


def test_fsdp2_trains_checkpoints_and_resumes(photos_dir, stage1_dir, tmp_path):
    fsdp = [
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        *PARALLEL,
        f"init_from={stage1_dir}",
        "data.batch_size=2",
        "data.train_batches_per_epoch=3",
    ]
    run_train(photos_dir, tmp_path / "straight", *fsdp)
    stopped = tmp_path / "stopped"
    run_train(photos_dir, stopped, *fsdp, "+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.step=3")
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / ".metadata").exists()  # a sharded (DCP) checkpoint
    run_train(photos_dir, stopped, *fsdp, "resume=auto")

    from unilip.training.distributed import load_sharded_checkpoint

    a = load_sharded_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_sharded_checkpoint(checkpoint)
    assert a["global_step"] == b["global_step"] == 6
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"resumed FSDP run differs in {different[:5]}"
    from safetensors.torch import load_file

    saved = load_file(stopped / "tokenizer" / "model.safetensors")  # gathered from the shards
    assert saved["decoder.conv_in.weight"].shape == (32, 32, 3, 3)
    from unilip.training.lineage import load_trained_tokenizer

    from_shards = load_trained_tokenizer(checkpoint).tokenizer.state_dict()  # what init_from=<that dir> loads
    assert all(torch.equal(from_shards[k], saved[k]) for k in saved)  # the same EMA weights


def test_hydra_sweep_runs_every_job(photos_dir, tmp_path):
    sweep = tmp_path / "sweep"
    run_train(
        photos_dir,
        tmp_path / "unused",
        "-m",
        "stage=1",
        "stages.stage1.max_steps=2",
        "stages.stage1.image_size=56",
        "data.train_batches_per_epoch=2",
        "data.num_workers=0",
        "optim.lr=1e-3,5e-4",
        f"hydra.sweep.dir={sweep}",
    )
    for job in ("0", "1"):
        assert (sweep / job / "tokenizer" / "model.safetensors").exists()
    assert (
        "5e-4" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
        or "0.0005" in (sweep / "1" / "config.yaml").read_text()
    )
