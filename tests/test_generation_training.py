"""Generation training through `train()` as `python train.py task=generate` runs it: the three stages
chained, what each one trains, the flow loss on a handful of captioned photos, resume, the CLI."""

import csv
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import compose_train
from tests.generation_helpers import (
    fingerprint,
    one_thread,  # noqa: F401  (autouse fixture)
)
from unilip.models.presets import CONF_DIR as REPO_CONF
from unilip.training.config import ConfigError
from unilip.training.run import train

NAME = "gen"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _cfg(photos_dir, runs_dir, stage, *extra, name=NAME):
    return compose_train(
        [
            "experiment=generate/quickstart",
            f"paths.data_dir={photos_dir}",
            f"paths.runs_dir={runs_dir}",
            f"name={name}",
            f"run_dir={runs_dir / name / 'generate' / f'stage{stage}'}",
            f"stage={stage}",
            "data.num_workers=0",
            "data.val_num_workers=0",
            "data.pin_memory=false",
            "data.batch_size=4",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "module.sample_steps=2",
            "+callbacks.snapshot._target_=tests.generation_helpers.GenerationSnapshot",
            f"+callbacks.snapshot.directory={runs_dir / f'snapshot{stage}-{name}'}",
            *extra,
        ]
    )


def _short(stage, steps):
    return [f"stages.stage{stage}.max_steps={steps}", f"data.train_batches_per_epoch={steps}"]


@pytest.fixture(scope="module")
def stage1(photos_dir, runs_dir, tokenizer_dir):
    return train(_cfg(photos_dir, runs_dir, 1, f"tokenizer_from={tokenizer_dir}", *_short(1, 3)))


@pytest.fixture(scope="module")
def handful(photos_dir, runs_dir):
    """8 captioned training photos at 56 px, one batch (every photo's caption at least once)."""
    from unilip.data import ShardDataModule

    data = ShardDataModule(
        val_urls=str(photos_dir / "photos" / "train-*.tar"),
        image_size=56,
        batch_size=64,
        num_workers=0,
        pin_memory=False,
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    first = {caption: i for i, caption in reversed(list(enumerate(batch["caption"])))}
    index = sorted(first.values()) + [i for i in range(64) if i not in first.values()]
    index = index[:8]
    handful = {
        "image": batch["image"][index].contiguous(),
        "caption": [batch["caption"][i] for i in index],
        "key": [batch["key"][i] for i in index],
    }
    torch.save(handful, runs_dir / "handful.pt")
    return handful


@pytest.fixture(scope="module")
def stage2(photos_dir, runs_dir, stage1, handful):
    """Stage 2 from stage 1 (found by run name), overfitting the handful: flow loss before and after."""
    from unilip.tasks.generation.setup import build_generation_training, load_trained_generator

    steps = 60
    cfg = _cfg(
        photos_dir,
        runs_dir,
        2,
        *_short(2, steps),
        "optim.lr=3e-3",
        "data._target_=tests.generation_helpers.FixedCaptionedBatches",
        f"+data.images_file={runs_dir / 'handful.pt'}",
        f"+data.steps={steps}",
        "+trainer.use_distributed_sampler=false",
    )
    module = build_generation_training(cfg)  # starts from stage 1's weights, as the run will
    before = module.fixed_timestep_loss(handful).item()
    run = train(cfg)
    module.generator.load_state_dict(load_trained_generator(run)[0].state_dict())
    after = module.fixed_timestep_loss(handful).item()
    return run, before, after


@pytest.fixture(scope="module")
def stage3(photos_dir, runs_dir, stage2):
    return train(_cfg(photos_dir, runs_dir, 3, *_short(3, 2), "module.ema_decay=0.9"))


def _changes(run_dir, snapshot):
    """part -> (tensors changed, tensors) between the initial and the saved generator."""
    initial = load_file(snapshot / "initial.safetensors")
    final = load_file(run_dir / "generator" / "model.safetensors")
    assert initial.keys() == final.keys()
    parts = {}
    for key in initial:
        part = key.split(".")[0]
        changed, total = parts.get(part, (0, 0))
        parts[part] = (changed + int(not torch.equal(initial[key], final[key])), total + 1)
    return parts


def _frozen_unchanged(cfg, snapshot, tokenizer_dir):
    """The LLM and tokenizer at the end equal their start and an independent fresh build, bit for bit."""
    from unilip.models import UniLIPTokenizer
    from unilip.models.mllm import build_language_model

    hashes = json.loads((snapshot / "frozen.json").read_text())
    assert hashes["llm_start"] == hashes["llm_end"] == fingerprint([build_language_model(instantiate(cfg.mllm))])
    fresh_tokenizer = UniLIPTokenizer.from_pretrained(tokenizer_dir)
    assert hashes["tokenizer_start"] == hashes["tokenizer_end"] == fingerprint([fresh_tokenizer])


def test_stage1_trains_connector_and_queries_with_the_dit_frozen(photos_dir, runs_dir, stage1, tokenizer_dir):
    changes = _changes(stage1, runs_dir / f"snapshot1-{NAME}")
    assert changes["dit"][0] == 0
    for part in ("queries", "connector", "projection"):
        assert changes[part][0] == changes[part][1], f"{part}: {changes[part]}"
    _frozen_unchanged(_cfg(photos_dir, runs_dir, 1), runs_dir / f"snapshot1-{NAME}", tokenizer_dir)
    meta = json.loads((stage1 / "generator" / "config.json").read_text())
    assert meta["stage"] == 1 and meta["latents"]["kind"] == "dcae"
    state = torch.load(stage1 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # frozen networks are not in checkpoints: the generator and the non-finite step counters only
    assert {key.split(".")[0] for key in state} == {"generator", "nonfinite"}
    assert list((stage1 / "samples").glob("generation_step*.png"))


def test_stage2_flow_loss_falls_on_a_handful_of_photos(photos_dir, runs_dir, stage1, stage2, tokenizer_dir):
    run, before, after = stage2
    with open(run / "logs" / "metrics.csv") as file:
        train_loss = [float(r["loss/flow"]) for r in csv.DictReader(file) if r.get("loss/flow")]
    print(
        f"stage 2, 8 photos, 60 steps: flow loss at t = 0.25/0.5/0.75 (fixed noise) {before:.3f} -> {after:.3f}; "
        f"training loss, first 5 steps {np.mean(train_loss[:5]):.3f}, last 5 {np.mean(train_loss[-5:]):.3f}"
    )
    assert after < 0.5 * before
    changes = _changes(run, runs_dir / f"snapshot2-{NAME}")
    assert all(changed == total for changed, total in changes.values()), changes  # the DiT trains too
    _frozen_unchanged(_cfg(photos_dir, runs_dir, 2), runs_dir / f"snapshot2-{NAME}", tokenizer_dir)
    meta = json.loads((run / "generator" / "config.json").read_text())
    assert meta["init_from"] == str(stage1) and meta["latents"] == {"kind": "unilip", "scale": 4.5}
    assert meta["tokenizer"]["source"] == str(tokenizer_dir.resolve())  # inherited from stage 1


def test_stage3_starts_from_stage2_and_trains_everything(photos_dir, runs_dir, stage2, stage3, tokenizer_dir):
    initial = load_file(runs_dir / f"snapshot3-{NAME}" / "initial.safetensors")
    stage2_weights = load_file(stage2[0] / "generator" / "model.safetensors")
    assert all(torch.equal(initial[k], stage2_weights[k]) for k in stage2_weights)
    changes = _changes(stage3, runs_dir / f"snapshot3-{NAME}")
    assert all(changed == total for changed, total in changes.values()), changes
    from unilip.tasks.generation.setup import load_trained_generator

    # with an EMA, the result is the EMA: the same weights a later stage reads from the checkpoint
    checkpoint = torch.load(stage3 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("ema.") for k in checkpoint)
    from_checkpoint = load_trained_generator(stage3 / "checkpoints" / "last.ckpt")[0].state_dict()
    saved = load_file(stage3 / "generator" / "model.safetensors")
    assert all(torch.equal(from_checkpoint[k], saved[k]) for k in saved)
    assert not torch.equal(checkpoint["generator.queries"], saved["queries"])  # EMA, not the raw weights
    _frozen_unchanged(_cfg(photos_dir, runs_dir, 3), runs_dir / f"snapshot3-{NAME}", tokenizer_dir)


def test_the_cli_generates_and_edits_with_the_trained_generator(stage3, tmp_path):
    from unilip.pipelines.generate import main

    generator = str(stage3 / "generator")
    common = ["--generator", generator, "--steps", "3", "--size", "84", "--seed", "5"]
    first = main(["t2i", "--prompt", "a cat", "--prompt", "a rocket", "--out", str(tmp_path / "a.png"), *common])
    second = main(["t2i", "--prompt", "a cat", "--prompt", "a rocket", "--out", str(tmp_path / "b.png"), *common])
    pixels = [np.asarray(Image.open(p)) for p in (*first, *second)]
    assert [p.shape for p in pixels] == [(84, 84, 3)] * 4
    assert np.array_equal(pixels[0], pixels[2]) and np.array_equal(pixels[1], pixels[3])  # same seed, same images
    assert not np.array_equal(pixels[0], pixels[1])
    Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    edited = main(
        [
            "edit",
            "--image",
            str(tmp_path / "in.png"),
            "--instruction",
            "flip it",
            "--out",
            str(tmp_path / "e.png"),
            *common,
        ]
    )
    assert np.asarray(Image.open(edited[0])).shape == (84, 84, 3)


def test_the_cli_says_what_is_wrong_in_one_line(stage3, tmp_path):
    from unilip.pipelines.generate import main

    (tmp_path / "notes.txt").write_text("not an image")
    edit = ["edit", "--generator", str(stage3 / "generator"), "--instruction", "x", "--out", str(tmp_path / "e.png")]
    t2i = ["t2i", "--generator", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "x.png")]
    cases = {
        tuple(t2i): "not a saved generator",
        (*edit, "--image", str(tmp_path / "missing.jpg")): "no such file",
        (*edit, "--image", str(tmp_path / "notes.txt")): "not a readable image",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit, match=rf"^error: .*{message}"):
            main([*argv, "--device", "cpu"])


@pytest.mark.numerics
def test_resume_is_exact(photos_dir, runs_dir, tokenizer_dir):
    steps = ["stages.stage1.max_steps=4", "data.train_batches_per_epoch=2", f"tokenizer_from={tokenizer_dir}"]
    straight = train(_cfg(photos_dir, runs_dir, 1, *steps, name="straight"))
    stop = ["+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.step=2"]
    train(_cfg(photos_dir, runs_dir, 1, *steps, *stop, name="resumed"))
    resumed = train(_cfg(photos_dir, runs_dir, 1, *steps, "resume=auto", name="resumed"))
    a = load_file(straight / "generator" / "model.safetensors")
    b = load_file(resumed / "generator" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("fused", [False, True], ids=["sync", "sync-free"])
def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(photos_dir, tmp_path, tokenizer_dir, fused):
    images = torch.full((4, 3, 64, 64), float("nan"))  # stage 1: DC-AE latents at 64 px
    torch.save({"image": images, "caption": ["a cat"] * 4}, tmp_path / "nan.pt")
    cfg = _cfg(
        photos_dir,
        tmp_path,
        1,
        *_short(1, 6),
        f"tokenizer_from={tokenizer_dir}",
        "data._target_=tests.generation_helpers.FixedCaptionedBatches",
        f"+data.images_file={tmp_path / 'nan.pt'}",
        "+data.steps=6",
        "+trainer.use_distributed_sampler=false",
        "module.max_nonfinite_streak=3",
        *(["+optim.optimizer.fused=true"] if fused else []),
    )
    with pytest.raises(RuntimeError, match="not finite for 3 steps in a row"):
        train(cfg)


def test_config_mistakes_fail_with_one_clear_error(photos_dir, runs_dir, tokenizer_dir, tmp_path):
    cases = {
        ("stage=2",): "stage 2 needs init_from",
        ("stage=4",): "stage=4 is not a generate stage",
        ("stages.stage2.image_size=50", "stage=2"): "not a multiple of 28",
        ("stage=1",): "needs tokenizer_from",
        ("stage=1", f"tokenizer_from={tokenizer_dir}", "generator.connector_layers=9"): "the LLM has 6 layers",
        ("stage=1", f"tokenizer_from={tokenizer_dir}", "mllm.internvl.text_config.hidden_size=64"): "do not fit",
    }
    for overrides, message in cases.items():
        stage = next(o for o in overrides if o.startswith("stage=")).split("=")[1]
        cfg = _cfg(photos_dir, tmp_path, stage, *overrides, name="fresh")
        with pytest.raises(ConfigError, match=message):
            train(cfg)
    assert compose_train(["stage=1", "run_dir=/tmp/x"]).task == "tokenizer"  # stage=1 alone: the tokenizer


GENERATE_EXPERIMENTS = sorted(p.stem for p in (REPO_CONF / "experiment" / "generate").glob("*.yaml"))


@pytest.mark.parametrize("experiment", GENERATE_EXPERIMENTS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_generation_experiment_composes_into_a_coherent_recipe(experiment, stage):
    from omegaconf import OmegaConf

    cfg = compose_train([f"experiment=generate/{experiment}", f"stage={stage}", "run_dir=/tmp/x"])
    OmegaConf.resolve(cfg)
    assert cfg.task == "generate" and cfg.trainer.max_steps == cfg.recipe.max_steps
    assert cfg.recipe.latent_space == ("dcae" if stage == 1 else "unilip") and cfg.recipe.train_dit == (stage > 1)
    assert cfg.mllm.internvl.text_config.hidden_size == cfg.model.config.llm_hidden_size  # MLLM fits the tokenizer
    assert cfg.generator.connector_layers <= cfg.mllm.internvl.text_config.num_hidden_layers
    assert cfg.module.train_dit == cfg.recipe.train_dit and cfg.data.image_size == cfg.recipe.image_size
    if experiment != "quickstart":  # the recipe (REFERENCE section 3)
        assert (cfg.generator.num_queries, cfg.generator.connector_layers, cfg.module.cfg_dropout) == (256, 6, 0.1)
        assert (cfg.optim.lr, cfg.optim.final_lr, cfg.module.warmup_ratio, cfg.module.weight_decay) == (
            1e-4,
            1e-5,
            0.003,
            0.0,
        )
        assert cfg.dit.transformer.caption_channels == 2304 and cfg.module.gradient_checkpointing
        released_scale = 10.6 if experiment == "unilip_1b" else 9.5  # the released tokenizers' record
        assert cfg.latent_scale is None and cfg.model.config.latent_scale == released_scale
        assert cfg.data.with_source and cfg.recipe.image_size == (512 if stage == 1 else 448)
