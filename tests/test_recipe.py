"""The tokenizer recipe's optimisation, checked on what the optimizer and the gradients actually are
(not on config values): parameter groups and their learning rates, weight decay, gradient isolation
between generator and discriminator, separate clipping, the GAN start, stage 1's frozen encoder."""

import csv
import json

import pytest
import torch

from tests.conftest import compose_train, quick_overrides
from unilip.models import UniLIPTokenizer
from unilip.tasks.tokenizer.setup import build_tokenizer_training
from unilip.training.run import train


@pytest.fixture(scope="module")
def saved_init(tiny_config, tmp_path_factory):
    """A tiny tokenizer saved as a stage-1 result (its encoder is the original): what stage 2 starts from."""
    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    UniLIPTokenizer(tiny_config).save_pretrained(
        root / "init", training={"stage": 1, "encoder_trained": False, "teacher": None}
    )
    return root / "init"


def _module(photos_dir, tmp_path, stage, *extra):
    overrides = [f"stage={stage}", f"stages.stage{stage}.image_size=56", "loss.perceptual_weight=0", *extra]
    return build_tokenizer_training(compose_train(quick_overrides(photos_dir, tmp_path / "run", *overrides)))


def _groups_by_param(optimizer):
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("stage", [1, 2])
def test_parameter_groups_learning_rates_and_weight_decay(photos_dir, saved_init, tmp_path, stage):
    extra = [f"init_from={saved_init}", "stages.stage2.gan_start_step=0"] if stage == 2 else []
    module = _module(photos_dir, tmp_path, stage, "optim.lr=2e-4", "optim.discriminator_lr=3e-4", *extra)
    optimizer = module.configure_optimizers()["optimizer"]
    groups = _groups_by_param(optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(groups)  # each parameter once
    tokenizer = module.tokenizer
    encoder = {id(p) for p in tokenizer.part_parameters("encoder")}
    trainable = {id(p) for p in tokenizer.parameters() if p.requires_grad}
    if stage == 1:  # the encoder is frozen: not optimised at all
        assert not encoder & groups.keys() and not any(p.requires_grad for p in tokenizer.part_parameters("encoder"))
        assert module.discriminator is None
    for name, param in tokenizer.named_parameters():
        if id(param) not in trainable:
            continue
        group = groups[id(param)]
        base = 2e-4 * (0.1 if id(param) in encoder else 1.0)  # the recipe: ViT + projector at 0.1x (stage 2)
        # the schedule's first factor (warm-up step 0 of 20) scales every group alike
        assert group["initial_lr"] == pytest.approx(base), name
        assert group["lr"] == pytest.approx(base / 20), name
        decays = param.ndim >= 2  # matrices and convolutions decay; norms, biases, LayerScale do not
        assert group["weight_decay"] == (1e-4 if decays else 0.0), name
    if stage == 2:
        assert encoder <= trainable
        for param in module.discriminator.parameters():
            group = groups[id(param)]
            assert group["initial_lr"] == pytest.approx(3e-4) and group["weight_decay"] == (
                1e-4 if param.ndim >= 2 else 0
            )


def test_generator_and_discriminator_gradients_are_isolated(photos_dir, saved_init, tmp_path):
    """The generator's adversarial term does not train D, and D's loss does not reach the generator."""
    module = _module(photos_dir, tmp_path, 2, f"init_from={saved_init}", "stages.stage2.gan_start_step=0")
    module.frozen.to(torch.device("cpu"))
    images = torch.rand(2, 3, 56, 56)
    generator, discriminator, _ = module._losses(images)
    assert "gan_g" in generator and "gan_d" in discriminator
    d_params = list(module.discriminator.parameters())
    g_params = [p for p in module.tokenizer.parameters() if p.requires_grad]
    from_generator = torch.autograd.grad(sum(generator.values()), d_params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in from_generator)
    from_discriminator = torch.autograd.grad(sum(discriminator.values()), g_params, allow_unused=True)
    assert all(g is None or not g.any() for g in from_discriminator)
    # and the adversarial term does reach the generator, D's loss does reach D
    assert any(g is not None and g.any() for g in torch.autograd.grad(generator["gan_g"], g_params, allow_unused=True))


def _record_run(photos_dir, saved_init, tmp_path, *extra):
    out = tmp_path / "record.json"
    train(
        compose_train(
            quick_overrides(
                photos_dir,
                tmp_path / "run",
                "stage=2",
                f"init_from={saved_init}",
                "stages.stage2.image_size=56",
                "stages.stage2.max_steps=4",
                "data.train_batches_per_epoch=4",
                "data.batch_size=2",
                "loss.perceptual_weight=0",
                "trainer.check_val_every_n_epoch=1000",
                "+callbacks.record._target_=tests.helpers.RecordOptimizerSteps",
                f"+callbacks.record.out={out}",
                *extra,
            )
        )
    )
    return json.loads(out.read_text())


def test_generator_and_discriminator_are_clipped_separately(photos_dir, saved_init, tmp_path):
    """Clipped at 1e-3, each side's gradient norm is 1e-3 on its own (joint clipping would split the budget:
    sqrt(g^2 + d^2) = 1e-3 with both below it)."""
    steps = _record_run(photos_dir, saved_init, tmp_path, "stages.stage2.gan_start_step=0", "optim.grad_clip=1e-3")
    for step in steps:
        assert step["generator_norm"] == pytest.approx(1e-3, rel=1e-3)
        assert step["discriminator_norm"] == pytest.approx(1e-3, rel=1e-3)


def test_the_discriminator_starts_at_the_gan_start_step(photos_dir, saved_init, tmp_path):
    """Before `gan_start_step` the discriminator has no gradient and does not change (no weight decay
    either); from that step it trains. Recorded at each optimizer step of a 4-step run starting at 2."""
    steps = _record_run(photos_dir, saved_init, tmp_path, "stages.stage2.gan_start_step=2")
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s["discriminator_norm"] is not None for s in steps] == [False, False, True, True]
    digests = [s["discriminator_digest"] for s in steps]  # D's weights before each step
    assert digests[0] == digests[1] == digests[2] != digests[3]


@pytest.mark.parametrize("stage", [0, 3, "1"])
def test_a_stage_the_tokenizer_does_not_have_is_a_user_error_naming_both_stages(stage):
    from unilip.errors import ConfigError
    from unilip.tasks.tokenizer.stages import check_stage

    assert check_stage(1) == 1 and check_stage(2) == 2
    with pytest.raises(ConfigError, match=r"stage=.* is not a tokenizer stage; use stage=1 .* or stage=2"):
        check_stage(stage)


def test_learning_rate_schedule_of_every_group_as_logged(photos_dir, saved_init, tmp_path):
    """Stage 2, six steps, warm-up 2, lr 1e-3 -> final 1e-4: the learning rate each group's decaying half
    logs (`lr/<part>`, after the step: the rate of the next one) follows linear warm-up then cosine, with the
    encoder at 0.1x and the discriminator at its own rate, read from the run's metrics file."""
    run = tmp_path / "run"
    overrides = [
        "stage=2",
        f"init_from={saved_init}",
        "stages.stage2.image_size=56",
        "stages.stage2.max_steps=6",
        "stages.stage2.gan_start_step=0",
        "data.train_batches_per_epoch=3",
        "loss.perceptual_weight=0",
        "optim.lr=1e-3",
        "optim.final_lr=1e-4",
        "optim.warmup_steps=2",
        "optim.discriminator_lr=3e-4",
        "trainer.check_val_every_n_epoch=1000",
    ]
    train(compose_train(quick_overrides(photos_dir, run, *overrides)))
    with open(run / "logs" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    # logged at steps 0..5, each the factor of the next step j = 1..6: warm-up (j + 1) / 2 capped at 1,
    # then 0.1 + 0.45 (1 + cos(pi (j - 2) / 4)), with cos(pi / 4) = 0.70710678
    factors = [1.0, 1.0, 0.86819805, 0.55, 0.23180195, 0.1]
    bases = {"bottleneck": 1e-3, "decoder": 1e-3, "encoder": 1e-4, "discriminator": 3e-4}
    for part, base in bases.items():
        logged = [(int(row["step"]), float(row[f"lr/{part}"])) for row in rows if row.get(f"lr/{part}")]
        assert [step for step, _ in logged] == [0, 1, 2, 3, 4, 5], part
        assert [lr for _, lr in logged] == pytest.approx([base * f for f in factors], rel=1e-6), part
