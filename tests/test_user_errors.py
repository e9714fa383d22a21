"""Users' mistakes with train.py, through the real CLI, one subprocess per case (harness: tests/user_errors.py):
one `error:` line, a non-zero exit, no traceback, nothing on disk changed."""

from __future__ import annotations

import pytest
import torch

from tests.user_errors import (
    SHORT,
    case,
    check,
    checkpoint_file,
    params,
    saved_tokenizer,
    text_file,
    train,
    trained_runs,  # noqa: F401  (a fixture some cases use)
    truncated,
)


@case("train: a stage that does not exist", "stage=3 is not a tokenizer stage; use stage=1")
def _(c):
    return train(c, "stage=3")


@case("train: a stage that is not a number", "stage='two' is not a tokenizer stage")
def _(c):
    return train(c, "stage=two")


@case("train: an option that does not exist", "Could not find 'experiment/quickstrat'")
def _(c):
    return train(c, "experiment=quickstrat")


@case("train: a run directory that holds another run's checkpoints", "already holds checkpoints; pass resume=auto")
def _(c):
    run = c.path("runs/default/tokenizer/stage1")
    checkpoint_file(run / "checkpoints" / "last.ckpt")
    text_file(run / ".hydra" / "config.yaml", "stage: 1\noptim:\n  lr: 0.0001\n")
    text_file(run / ".hydra" / "overrides.yaml", "- stage=1\n")
    text_file(run / "train.log", "[the log of the run that made these checkpoints]\n")
    return train(c, "stage=1", "optim.lr=0.5")


@case("train: a data directory that does not exist", "data.train_sources[short_caption].urls: no shard matches")
def _(c):
    return train(c, "data=blip3o", f"paths.data_dir={c.path('nowhere')}")


@case("train: an empty data folder", "no shard matches")
def _(c):
    c.path("empty").mkdir()
    return train(c, f"data.train_sources.0.urls={c.path('empty')}/*.tar")


@case("train: a folder given as a shard", "is a directory, not a shard; give the shards in it")
def _(c):
    return train(c, f"data.train_sources.0.urls={c.photos / 'photos'}")


@case("train: init_from a saved tokenizer with truncated weights", "is not a readable safetensors file")
def _(c):
    truncated(saved_tokenizer(c) / "model.safetensors")
    return train(c, "stage=2", f"init_from={c.path('tokenizer')}")


@case("train: init_from a truncated checkpoint", "is not a PyTorch checkpoint")
def _(c):
    return train(c, "stage=2", f"init_from={truncated(checkpoint_file(c.path('run.ckpt')))}")


@case("train: init_from a text file named .ckpt", "is not a PyTorch checkpoint")
def _(c):
    return train(c, "stage=2", f"init_from={text_file(c.path('notes.ckpt'))}")


@case("train: resume from a truncated checkpoint", "is not a readable checkpoint (truncated")
def _(c):
    return train(c, f"resume={truncated(checkpoint_file(c.path('step.ckpt')))}")


@case("train: resume=auto from a truncated last.ckpt", "latest earlier one: resume=")
def _(c):
    checkpoints = c.path("runs/default/tokenizer/stage1/checkpoints")
    checkpoint_file(checkpoints / "step0000100.ckpt")
    truncated(checkpoint_file(checkpoints / "step0000200.ckpt"))  # killed while written: not the one to name
    truncated(checkpoint_file(checkpoints / "last.ckpt"))
    return train(c, "resume=auto")


@case("train: resume from a run directory", "is a directory that holds no checkpoint")
def _(c):
    checkpoint_file(c.path("runs/old/tokenizer/stage1/checkpoints/last.ckpt"))
    return train(c, f"resume={c.path('runs/old/tokenizer/stage1')}")


@case("train: the learning rate as a word", "optim.lr='fast': must be a number > 0")
def _(c):
    return train(c, *SHORT, "optim.lr=fast")


@case("train: a negative learning rate", "optim.lr=-0.0001: must be a number > 0")
def _(c):
    return train(c, *SHORT, "optim.lr=-1e-4")


@case("train: a learning rate that is not a number", "optim.lr=nan: must be a number > 0")
def _(c):
    return train(c, *SHORT, "optim.lr=nan")


# README's own example on the quick start, whose schedule ends at 1e-4


@case("train: a learning rate below where its schedule ends", "optim.lr=5e-05 is below optim.final_lr=0.0001")
def _(c):
    return train(c, "experiment=quickstart", *SHORT, "optim.lr=5e-5")


@case("train: an image size that is a word", "stages.stage1.image_size='big': must be an integer >= 1")
def _(c):
    return train(c, *SHORT, "stages.stage1.image_size=big")


@case("train: a checkpoint every 0 steps", "checkpoint_every=0: must be an integer >= 1")
def _(c):
    return train(c, *SHORT, "checkpoint_every=0")


@case("train: an EMA decay above 1", "optim.ema_decay=2: must be a number in [0, 1)")
def _(c):
    return train(c, *SHORT, "optim.ema_decay=2")


@case("train: a negative validation batch size", "data.val_batch_size=-1: must be an integer >= 1 or null")
def _(c):
    return train(c, *SHORT, "data.val_batch_size=-1")


@case("train: a negative number of steps", "stages.stage1.max_steps=-5: must be an integer >= 1")
def _(c):
    return train(c, *SHORT, "stages.stage1.max_steps=-5")


@case("train: zero devices", "trainer.devices=0: must be a count >= 1")
def _(c):
    return train(c, *SHORT, "trainer.devices=0")


@case("train: several mistakes, one line", "optim.lr=-1: must be a number > 0; checkpoint_every=0: must be")
def _(c):
    return train(c, *SHORT, "optim.lr=-1", "checkpoint_every=0")


@case("train: generation, a prompt dropout above 1", "module.cfg_dropout=1.5: must be a number in [0, 1]")
def _(c):
    short = ["stages.stage1.max_steps=2", "data.train_batches_per_epoch=2"]
    return train(c, "task=generate", "stage=1", "experiment=generate/quickstart", *short, "module.cfg_dropout=1.5")


@case("train: unified, a learning rate of 0", "stages.stage1.lr=0: must be a number > 0")
def _(c):
    return train(c, "task=unified", "stage=1", "experiment=unified/quickstart", "stages.stage1.lr=0")


@case("train: validation shards in which nothing can be read", "data.val_urls: no validation sample could be read")
def _(c):
    return train(c, *SHORT, f"data.val_urls={text_file(c.path('val-000000.tar'), 'not a tar')}")


# resume=auto with what a resumed run cannot change: refused before anything of the run is rewritten
# (.hydra/, config.yaml, logs/hparams.yaml, train.log, checkpoints)


@case("train: resume with another model", "model.config.encoder: internvit -> dinov2_with_registers")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "model=tiny_dinov2")


@case("train: resume with another batch size", "global batch (data.batch_size x processes): 2 (2 x 1) -> 4 (4 x 1)")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "data.batch_size=4")


@case("train: resume at another image size", "data.image_size: 56 -> 112")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "stages.stage1.image_size=112")


@case("train: resume with another loss", "loss.l2_weight: 1.0 -> 2")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "loss.l2_weight=2")


@case("train: resume with another optimiser", "optim.lr: 0.0001 -> 0.0002")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "optim.lr=2e-4")


@case("train: resume a stage-1 checkpoint as stage 2", "stage: 1 -> 2")
def _(c):
    run = c.trained_run()
    return train(c, *SHORT, "stage=2", f"resume={run / 'checkpoints' / 'last.ckpt'}")


@case("train: resume a tokenizer checkpoint as a generation run", "task: tokenizer -> generate")
def _(c):
    run = c.trained_run()
    return train(c, "task=generate", "experiment=generate/quickstart", f"resume={run / 'checkpoints' / 'last.ckpt'}")


@case("train: encoder weights of another encoder", "is a 'siglip_vision_model' checkpoint, the tokenizer's encoder")
def _(c):
    from tests.test_encoder_export import home_checkpoint

    home_checkpoint("siglip", c.path("siglip"))
    return train(c, "model=tiny_dinov2", f"model.encoder_weights={c.path('siglip')}")


@case("train: a latent cache made with another tokenizer", "was made with tokenizer.weights_sha256=")
def _(c):
    from unilip.tasks.generation.cache_latents import main as cache_latents

    common = ["experiment=generate/quickstart", f"paths.data_dir={c.photos}", "stage=1", "data.num_workers=0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits for a preempted peer on a shared machine
    try:
        cache_latents([*common, f"tokenizer_from={saved_tokenizer(c)}", f"latent_cache.dir={c.path('latents')}"])
    finally:
        torch.set_num_threads(threads)
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.manual_seed(1)
    UniLIPTokenizer(tokenizer_preset("tiny")).save_pretrained(other := c.path("other"))
    return train(c, *common, "task=generate", f"tokenizer_from={other}", f"latent_cache.dir={c.path('latents')}")


@case("train: the unified task without a generator", "task=unified needs generator_from=")
def _(c):
    return train(c, "task=unified", "stage=1", "experiment=unified/quickstart", "generator_from=null")


@pytest.mark.parametrize("name", params(__name__))
def test_a_train_mistake_is_one_error_line_and_changes_nothing(name, photos_dir, tmp_path, request):
    check(name, photos_dir, tmp_path, request)
