"""Tokenizer training on the bundled photos: what the paper's stages claim, at toy size."""

import csv
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_train, quick_overrides
from unilip.errors import UserError
from unilip.training.run import train


def _metrics(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return lambda key: [float(r[key]) for r in rows if r.get(key)]


def _run(data_root, run_dir, *extra):
    cfg = compose_train(quick_overrides(data_root, run_dir, *extra))
    return train(cfg)


@pytest.fixture(scope="module")
def stage1_run(photos_dir, tmp_path_factory):
    """Stage 1, 60 steps at 112 px; the starting point of the stage-2 tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "stage1"
    cfg = compose_train(
        quick_overrides(
            photos_dir,
            run_dir,
            "stage=1",
            "stages.stage1.max_steps=60",
            "data.train_batches_per_epoch=30",
            "loss.perceptual_weight=0",
        )
    )
    from hydra.utils import instantiate

    torch.manual_seed(cfg.seed)
    before = instantiate(cfg.model).state_dict()  # the same seed builds the same initial tokenizer
    train(cfg)
    return run_dir, before


def test_stage1_loss_falls_and_the_encoder_stays_frozen(stage1_run):
    run_dir, before = stage1_run
    metric = _metrics(run_dir)
    l2 = metric("loss/l2")
    assert len(l2) == 60
    first, last = sum(l2[:5]) / 5, sum(l2[-5:]) / 5
    print(f"stage 1 L2: first 5 steps {first:.4f}, last 5 {last:.4f}; val PSNR {metric('val/psnr')}")
    assert last < 0.6 * first
    after = load_file(run_dir / "tokenizer" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("vision_tower.", "multi_modal_projector."))]
    trained = [k for k in before if k.startswith(("residual_blocks.", "down_mlp.", "decoder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) == len(trained)
    # the result is the EMA of the weights (what validation used), not the last raw weights
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(after[k], state["ema." + k.replace(".", "__")]) for k in trained)
    assert any(not torch.equal(after[k], state["tokenizer." + k]) for k in trained)


def _stage2(photos_dir, stage1_dir, run_dir, distill_weight):
    _run(
        photos_dir,
        run_dir,
        "stage=2",
        f"init_from={stage1_dir}",
        "stages.stage2.max_steps=40",
        "stages.stage2.gan_start_step=1000",
        "data.train_batches_per_epoch=40",
        "loss.perceptual_weight=0",
        f"stages.stage2.distill_weight={distill_weight}",
    )
    return _metrics(run_dir)("val/teacher_cosine")[-1]


@pytest.fixture
def distill_runs(photos_dir, stage1_run, tmp_path):
    stage1_dir, _ = stage1_run
    return {w: _stage2(photos_dir, stage1_dir, tmp_path / f"w{w}", w) for w in (1.0, 0.0)}


def test_stage2_teacher_cosine_with_and_without_distillation(distill_runs):
    print(f"teacher-feature cosine after stage 2: distill 1 -> {distill_runs[1.0]:.4f}, 0 -> {distill_runs[0.0]:.4f}")
    assert distill_runs[1.0] >= 0.99
    assert distill_runs[0.0] < distill_runs[1.0] - 0.01


def _fixed_batches(tmp_path, images):
    torch.save(images, tmp_path / "images.pt")
    return [
        "data._target_=tests.helpers.FixedGlobalBatches",
        f"+data.images_file={tmp_path / 'images.pt'}",
        "+data.global_batch=2",
        "+data.steps=6",
        "trainer.check_val_every_n_epoch=1000",
        "stages.stage1.max_steps=6",
        "loss.perceptual_weight=0",
        "stages.stage1.image_size=56",
        "checkpoint_every=100",
    ]


def test_a_non_finite_step_is_skipped_and_counted(photos_dir, tmp_path):
    images = torch.rand(12, 3, 56, 56)
    images[2] = float("nan")  # the second global batch
    run_dir = tmp_path / "run"
    _run(photos_dir, run_dir, *_fixed_batches(tmp_path, images), "trainer.max_steps=5")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 5  # 6 batches, one skipped: 5 optimizer steps
    assert state["state_dict"]["nonfinite.total"] == 1 and state["state_dict"]["nonfinite.streak"] == 0
    assert state["lr_schedulers"][0]["last_epoch"] == 5  # the schedule follows the optimizer steps
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_too_many_non_finite_steps_stop_the_run(photos_dir, tmp_path):
    images = torch.full((12, 3, 56, 56), float("nan"))
    # a user's error (one line in the CLI) that says where the run can go on from: here, nowhere
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row.*no checkpoint had been written when they"):
        _run(photos_dir, tmp_path / "run", *_fixed_batches(tmp_path, images), "module.max_nonfinite_streak=3")


def test_sync_free_skip_with_fused_adamw(photos_dir, tmp_path):
    """Fused AdamW skips a bad step on the device (no host sync): weights, moments and LeCam stay finite."""
    images = torch.rand(12, 3, 56, 56)
    images[2] = float("nan")
    run_dir = tmp_path / "run"
    fixed = [o for o in _fixed_batches(tmp_path, images) if not o.startswith("stages.stage1.max_steps")]
    _run(photos_dir, run_dir, *fixed, "stages.stage1.max_steps=6", "+optim.optimizer.fused=true")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6  # the bad step is skipped inside the optimizer, so it still counts
    assert state["state_dict"]["nonfinite.total"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    moments = state["optimizer_states"][0]["state"]
    assert all(torch.isfinite(m["exp_avg"]).all() and torch.isfinite(m["exp_avg_sq"]).all() for m in moments.values())


def test_sync_free_skip_still_stops_a_run_of_bad_steps(photos_dir, tmp_path):
    images = torch.full((12, 3, 56, 56), float("nan"))
    with pytest.raises(RuntimeError, match="not finite for 3 steps in a row"):
        _run(
            photos_dir,
            tmp_path / "run",
            *_fixed_batches(tmp_path, images),
            "module.max_nonfinite_streak=3",
            "+optim.optimizer.fused=true",
        )


@pytest.mark.parametrize("fused", [False, True], ids=["synced", "sync-free"])
def test_a_finite_loss_with_non_finite_gradients_is_skipped(photos_dir, tmp_path, fused):
    """A NaN gradient under a finite loss must not reach the weights (through clipping, it would make every
    gradient NaN, and AdamW every weight)."""
    run_dir = tmp_path / "run"
    images = torch.rand(12, 3, 56, 56)
    _run(
        photos_dir,
        run_dir,
        *_fixed_batches(tmp_path, images),
        "trainer.max_steps=5" if not fused else "+optim.optimizer.fused=true",
        "+callbacks.nan._target_=tests.helpers.NonFiniteGradientAt",
        "+callbacks.nan.batch=2",
    )
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"]["nonfinite.total"] == 1 and state["state_dict"]["nonfinite.streak"] == 0
    assert state["global_step"] == (6 if fused else 5)  # sync-free: skipped inside the optimizer, still counted
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    moments = state["optimizer_states"][0]["state"]
    assert all(torch.isfinite(m["exp_avg"]).all() and torch.isfinite(m["exp_avg_sq"]).all() for m in moments.values())


def test_frozen_parts_stay_in_eval_mode_through_validation(photos_dir, tmp_path):
    """Lightning switches the whole module to train mode at fit start and after each validation; the frozen
    stage-1 ViT and projector must stay in eval mode (what InternVL computes at inference)."""
    out = tmp_path / "modes.json"
    modules = ["tokenizer.vision_tower", "tokenizer.multi_modal_projector", "tokenizer.decoder"]
    _run(
        photos_dir,
        tmp_path / "run",
        "stage=1",
        "stages.stage1.max_steps=4",
        "stages.stage1.image_size=56",
        "data.train_batches_per_epoch=2",  # a validation after step 2
        "data.batch_size=2",
        "loss.perceptual_weight=0",
        "+callbacks.modes._target_=tests.helpers.RecordTrainingModes",
        f"+callbacks.modes.modules=[{','.join(modules)}]",
        f"+callbacks.modes.out={out}",
    )
    import json

    rows = json.loads(out.read_text())
    assert len(rows) == 4
    for row in rows:  # before and after the validation
        assert row == {modules[0]: False, modules[1]: False, modules[2]: True}


def test_validation_metrics_are_eval_py_metrics(photos_dir, tmp_path):
    """The PSNR / SSIM logged during training are eval.py's: per-image, averaged over images, on the same
    held-out photos and weights (the EMA), whatever the batching."""
    run_dir = tmp_path / "run"
    _run(
        photos_dir,
        run_dir,
        "stage=1",
        "stages.stage1.max_steps=3",
        "stages.stage1.image_size=56",
        "data.train_batches_per_epoch=3",
        "data.batch_size=4",
        "data.val_batch_size=5",  # 12 photos: batches of 5, 5, 2
        "loss.perceptual_weight=0",
    )
    logged = _metrics(run_dir)
    from tests.conftest import compose_eval
    from unilip.evaluation.run import evaluate

    results = evaluate(compose_eval(photos_dir, tmp_path / "eval", f"ckpt={run_dir}", "protocol=56"))
    for name in ("psnr", "ssim"):
        assert logged(f"val/{name}")[-1] == pytest.approx(results["aggregate"][name]["mean"], abs=1e-4), name


def test_stage2_can_carry_the_discriminator_over(photos_dir, tmp_path):
    """discriminator_from=init starts D and the LeCam EMAs from init_from's run (e.g. 448 px from 224 px);
    the default starts a fresh D whose LR warms up from 0 like every group's (the reference's choice)."""
    first = tmp_path / "gan"
    gan = [
        "stages.stage2.image_size=56",
        "data.batch_size=2",
        "loss.perceptual_weight=0",
        "stages.stage2.distill_weight=0",
    ]
    _run(photos_dir, tmp_path / "s1", "stage=1", "stages.stage1.max_steps=2", "stages.stage1.image_size=56")
    _run(
        photos_dir,
        first,
        "stage=2",
        f"init_from={tmp_path / 's1'}",
        "stages.stage2.max_steps=4",
        "stages.stage2.gan_start_step=1",
        *gan,
    )
    trained = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    from unilip.tasks.tokenizer.setup import build_tokenizer_training

    def module(*extra):
        overrides = ["stage=2", f"init_from={first}", "stages.stage2.max_steps=4", "stages.stage2.gan_start_step=0"]
        return build_tokenizer_training(
            compose_train(quick_overrides(photos_dir, tmp_path / "next", *overrides, *gan, *extra))
        )

    carried = module("discriminator_from=init")
    for key, value in carried.discriminator.state_dict().items():
        assert torch.equal(value, trained[f"discriminator.{key}"]), key
    assert carried.lecam.ema_real == trained["lecam.ema_real"] and bool(carried.lecam.initialised)
    fresh = module()
    assert not torch.equal(fresh.discriminator.state_dict()["main.0.weight"], trained["discriminator.main.0.weight"])
    assert not bool(fresh.lecam.initialised)
    optimizer = fresh.configure_optimizers()["optimizer"]
    first_lr = [g["lr"] for g in optimizer.param_groups if g["name"] == "discriminator"]
    assert first_lr == [pytest.approx(fresh.discriminator_lr / fresh.warmup_steps)] * 2  # warming up from 0
    with pytest.raises(Exception, match="holds no discriminator"):
        build_tokenizer_training(
            compose_train(
                quick_overrides(
                    photos_dir,
                    tmp_path / "n2",
                    "stage=2",
                    f"init_from={tmp_path / 's1'}",
                    "stages.stage2.max_steps=4",
                    "stages.stage2.gan_start_step=0",
                    "discriminator_from=init",
                    *gan,
                )
            )
        )


def test_a_resumed_wandb_run_continues_under_its_id_with_the_resolved_config(photos_dir, tmp_path, monkeypatch):
    """logger=wandb (offline here): the resumed run logs into the same W&B run, and the run's config holds the
    whole resolved config (not only the command-line overrides)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    common = [
        "stage=1",
        "stages.stage1.max_steps=4",
        "stages.stage1.image_size=56",
        "data.train_batches_per_epoch=2",
        "data.batch_size=2",
        "loss.perceptual_weight=0",
        "logger=wandb",
        "checkpoint_every=2",
    ]
    _run(photos_dir, run_dir, *common, "+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.step=2")
    wandb.finish()
    _run(photos_dir, run_dir, *common, "resume=auto")
    wandb.finish()
    records = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2 and records[0].name == records[1].name  # run-<id>.wandb: one id, two sessions
    keys = (b"discriminator_from", b"checkpoint_every", b"warmup_steps")  # config keys no override named
    for record in records:
        # wandb's service process writes the record; on a loaded machine it can still be at it after finish()
        deadline = time.monotonic() + 120
        while not all(key in record.read_bytes() for key in keys) and time.monotonic() < deadline:
            time.sleep(1)
        raw = record.read_bytes()
        assert all(key in raw for key in keys), raw[:200]


def test_a_first_run_on_a_fresh_clone_builds_the_photos_before_planning_its_steps(photos_dir, tmp_path, monkeypatch):
    """No data folder at all, as on a fresh clone: the photos are built once, before the step plan expands the
    shard globs (which used to stop the README's first command with "no shard matches")."""
    import shutil

    built = []

    def build(out_dir) -> None:  # a copy of the session's set: the ordering is under test, not the builder
        built.append(str(out_dir))
        shutil.copytree(photos_dir / "photos", out_dir)

    monkeypatch.setattr("unilip.data.samples.build_photo_shards", build)
    fresh = tmp_path / "fresh" / "data"
    run_dir = _run(fresh, tmp_path / "run", "stage=1", "stages.stage1.max_steps=2", "stages.stage1.image_size=56")
    assert built == [str(fresh / "photos")]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
