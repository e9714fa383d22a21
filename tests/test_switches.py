"""Every speed switch of tokenizer training computes the same thing (fp32, CPU)."""

import pytest
import torch

from tests.conftest import compose_train, quick_overrides
from unilip.models import UniLIPTokenizer
from unilip.training.run import train

SWITCHES = {
    "gradient checkpointing": ["module.gradient_checkpointing=true"],
    "channels-last decoder and discriminator": ["module.channels_last=true"],
    "torch.compile (graph capture, aot_eager)": ["module.compile=aot_eager"],
    "no per-step finite check": ["module.skip_nonfinite=false"],
}


@pytest.fixture(scope="module")
def baseline(photos_dir, tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("switches")
    torch.manual_seed(0)
    UniLIPTokenizer(tiny_config).save_pretrained(
        root / "init", training={"stage": 1, "encoder_trained": False, "teacher": None}
    )
    images = torch.rand(12, 3, 56, 56)
    torch.save(images, root / "images.pt")
    common = [
        "stage=2",
        f"init_from={root / 'init'}",
        "stages.stage2.max_steps=3",
        "stages.stage2.gan_start_step=1",
        "stages.stage2.image_size=56",
        "data._target_=tests.helpers.FixedGlobalBatches",
        f"+data.images_file={root / 'images.pt'}",
        "+data.global_batch=4",
        "+data.steps=3",
        "trainer.check_val_every_n_epoch=1000",
        "loss.perceptual_weight=0",
    ]

    def run(name, *extra):
        run_dir = root / name
        train(compose_train(quick_overrides(photos_dir, run_dir, *common, *extra)))
        return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    return run, run("baseline")


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_changes_nothing(baseline, switch):
    run, reference = baseline
    state = run(switch.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""), *SWITCHES[switch])
    worst = max(
        (state[k].float() - reference[k].float()).abs().max().item()
        for k in reference
        if reference[k].is_floating_point()
    )
    print(f"{switch}: max |difference| after 3 steps (GAN on) = {worst:.2e}")
    assert worst < 1e-5


def test_bf16_autocast_stays_close(baseline):
    run, reference = baseline
    state = run("bf16", "trainer.precision=bf16-mixed")
    deltas = [
        (state[k].float() - reference[k].float()).abs().max().item()
        for k in reference
        if k.startswith("tokenizer.decoder.") and reference[k].is_floating_point()
    ]
    print(f"bf16-mixed vs fp32: max |difference| in decoder weights after 3 steps = {max(deltas):.2e}")
    assert max(deltas) < 5e-3  # bf16 rounding, three AdamW steps at lr <= 1.5e-4


def test_fused_adamw_matches_the_default_adamw():
    """The optimizer switch in isolation: on the same gradients fused and foreach AdamW agree.

    (End to end, AdamW turns rounding differences in near-zero gradients into updates of size lr,
    so whole-run comparisons say little about the optimizer itself.)
    """
    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    results = []
    for fused in (False, True):
        weights = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW(weights, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, fused=fused)
        for step_grads in grads:
            for weight, grad in zip(weights, step_grads, strict=True):
                weight.grad = grad.clone()
            opt.step()
        results.append(weights)
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
