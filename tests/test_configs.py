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


# every preset with each of its task's stages: what the config schema must accept
PRESETS = [(e, s, "tokenizer") for e in EXPERIMENTS for s in (1, 2)]
PRESETS += [
    (f"generate/{p.stem}", s, "generate")
    for p in sorted((CONF_DIR / "experiment/generate").glob("*.yaml"))
    for s in (1, 2, 3)
]
PRESETS += [
    (f"unified/{p.stem}", s, "unified")
    for p in sorted((CONF_DIR / "experiment/unified").glob("*.yaml"))
    for s in (1, 2)
]


@pytest.mark.parametrize(("experiment", "stage", "task"), PRESETS)
def test_every_preset_passes_the_config_check(experiment, stage, task, tmp_path):
    from unilip.training.config import check_train_config

    overrides = [f"task={task}", f"experiment={experiment}", f"stage={stage}", f"paths.runs_dir={tmp_path}"]
    cfg = compose_train([*overrides, f"run_dir={tmp_path / 'run'}"])
    if cfg.init_from is not None:  # a preset that starts from another preset's run (448 px from 224 px)
        Path(cfg.init_from).mkdir(parents=True)
    check_train_config(cfg)


def test_the_schemas_choices_are_the_ones_the_code_takes():
    import typing

    from lightning.fabric import connector
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from unilip.data.transforms import RESIZE_MODES
    from unilip.evaluation.config import EvalConfig
    from unilip.evaluation.protocols import RESIZES
    from unilip.evaluation.quantize import QUANTIZE
    from unilip.schema import Data, Precision, Trainer

    def choices(schema, name):
        return set(typing.get_args(typing.get_type_hints(schema)[name]))

    lightning_precisions = [connector._PRECISION_INPUT_STR, connector._PRECISION_INPUT_INT]
    assert set(typing.get_args(Precision)) == {p for kind in lightning_precisions for p in typing.get_args(kind)} | set(
        typing.get_args(connector._PRECISION_INPUT_STR_ALIAS)
    )
    assert choices(Trainer, "accelerator") == set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"}
    assert choices(Data, "resize") == set(RESIZE_MODES)
    assert choices(EvalConfig, "protocol_resize") == set(RESIZES)
    assert choices(EvalConfig, "quantize") == set(QUANTIZE)
