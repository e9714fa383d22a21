"""Every experiment composes; the recipe reaches the objects it configures."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_train
from unilip.models.presets import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", [1, 2])
def test_every_experiment_composes_and_resolves(experiment, stage, tmp_path):
    cfg = compose_train([f"experiment={experiment}", f"stage={stage}", f"run_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.trainer.max_steps == cfg.stages[f"stage{cfg.stage}"].max_steps
    assert cfg.data.image_size == cfg.recipe.image_size
    assert cfg.loss.distill_weight == cfg.recipe.distill_weight


def test_unilip_recipe_values():
    cfg = compose_train(["experiment=unilip_1b_224", "stage=2", "run_dir=/tmp/x"])
    assert cfg.model.config.llm_hidden_size == 896
    assert cfg.model.internvl_weights == "OpenGVLab/InternVL3-1B-hf"
    assert (cfg.recipe.max_steps, cfg.recipe.gan_start_step, cfg.recipe.encoder_lr_multiplier) == (400000, 200000, 0.1)
    assert (cfg.optim.lr, cfg.optim.final_lr, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (1e-4, 1e-5, 10000, 1.0)
    assert tuple(cfg.optim.optimizer.betas) == (0.9, 0.999) and cfg.optim.optimizer.weight_decay == 1e-4
    assert (cfg.loss.l2_weight, cfg.loss.perceptual_weight, cfg.loss.convnext_weight, cfg.loss.gan_weight) == (
        1.0,
        1.1,
        0.1,
        0.1,
    )
    assert cfg.loss.lecam_weight == 0.001 and cfg.module.lecam_decay == 0.999
    stage448 = compose_train(["experiment=unilip_1b_448", "run_dir=/tmp/x"])
    assert (stage448.stage, stage448.recipe.image_size, stage448.recipe.gan_start_step) == (2, 448, 0)
    assert Path(stage448.init_from).parts[-3:] == ("unilip_1b_224", "tokenizer", "stage2")
    assert compose_train(["experiment=unilip_2b_224", "run_dir=/tmp/x"]).model.config.llm_hidden_size == 1536
