"""Every speed switch of tokenizer training computes the same thing (fp32, CPU).

Switches that run the baseline's own kernels (recomputation, a traced graph of the same operations, one check
less) must give its weights after three steps. Switches that run other kernels (channels-last convolutions,
bf16) round differently, and AdamW turns a rounding difference in a gradient near zero into a difference of
up to its learning rate in a weight (its step is lr x g / (|g| + 1e-8)), by an amount that depends on the CPU.
They are compared on their first step of plain SGD instead, whose update is the gradient itself.
"""

import pytest
import torch

from tests.conftest import compose_train, quick_overrides
from unilip.models import UniLIPTokenizer
from unilip.training.run import train

pytestmark = pytest.mark.numerics

SWITCHES = {  # the baseline's kernels
    "gradient checkpointing": ["module.gradient_checkpointing=true"],
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

    from safetensors.torch import load_file

    return run, run("baseline"), load_file(root / "init" / "model.safetensors")


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_changes_nothing(baseline, switch):
    run, reference, _ = baseline
    state = run(switch.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""), *SWITCHES[switch])
    worst = max(
        (state[k].float() - reference[k].float()).abs().max().item()
        for k in reference
        if reference[k].is_floating_point()
    )
    print(f"{switch}: max |difference| after 3 steps (GAN on) = {worst:.2e}")
    assert worst < 1e-5  # measured 0.0 under every kernel set of .ci/numerics: the same operations, in order


def _updates(state, init, prefix="tokenizer.decoder."):
    """The weight change of the parameters under `prefix` over the run, flattened (vs the initial tokenizer)."""
    return torch.cat(
        [
            (state[k].float() - init[k[len("tokenizer.") :]].float()).flatten()
            for k in sorted(state)
            if k.startswith(prefix)
        ]
    )


PARTS = {
    "encoder": ("tokenizer.vision_tower.", "tokenizer.multi_modal_projector."),
    "bottleneck": ("tokenizer.residual_blocks.", "tokenizer.down_mlp."),
    "decoder": ("tokenizer.decoder.",),
    "discriminator": ("discriminator.",),
}
# One plain-SGD step, unclipped, with the GAN on from that step: the update is -lr x gradient (+ weight decay).
# The update is read back as new - old float32 weights, each rounded to 2^-24 of its size (~0.05); a large LR
# keeps the update (~1e-2 per weight) far above that rounding (~3e-9).
FIRST_SGD_STEP = [
    "optim.optimizer._target_=torch.optim.SGD",
    "~optim.optimizer.betas",
    "optim.lr=10",
    "optim.discriminator_lr=10",
    "optim.grad_clip=null",
    "stages.stage2.max_steps=1",
    "data.steps=1",
    "stages.stage2.gan_start_step=0",
]


@pytest.fixture(scope="module")
def first_sgd_step(baseline):
    """The fp32 run's weights after one SGD step, and every trained weight before it (the discriminator's from
    a run whose discriminator LR is 0: SGD then leaves it exactly as it was drawn)."""
    run, _, init = baseline
    unmoved = run("sgd_discriminator_lr_0", *FIRST_SGD_STEP, "optim.discriminator_lr=0")
    before = {f"tokenizer.{k}": v for k, v in init.items()} | {
        k: v for k, v in unmoved.items() if k.startswith("discriminator.")
    }
    return run, run("sgd_fp32", *FIRST_SGD_STEP), before


def _compare_parts(reference, state, before, label):
    """(cosine, relative difference) of the two runs' updates, for each part that trains."""
    results = {}
    for part, prefixes in PARTS.items():
        a, b = (
            torch.cat([(s[k] - before[k]).flatten() for k in sorted(s) if k.startswith(prefixes)])
            for s in (reference, state)
        )
        results[part] = cosine, relative = (
            torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            ((b - a).norm() / a.norm()).item(),
        )
        print(f"{label} vs fp32, first SGD step, {part}: cosine {cosine:.6f}, relative difference {relative:.2e}")
    return results


def test_channels_last_takes_the_same_step(first_sgd_step):
    """The channels-last decoder and discriminator run oneDNN's NHWC convolutions, which may sum in another
    order than the default ones: the same update to float32 rounding. Expected spread: float32 keeps 24 bits
    (rounding 2^-24 = 6e-8), and this model's first step turns a rounding of the operands into a relative
    difference about 150 times larger (bf16: 2^-9 = 0.2 % in, 13 to 29 % out; see below), so at most about
    1e-5. Measured: 0 for the tokenizer's parts (the same sums here), up to 3.9e-7 for the discriminator's
    weight gradients, under every kernel set of .ci/numerics. The bound 1e-4 is 10 times the estimate; a real
    error is far outside it (a convolution reading its input in the wrong layout: a difference of ~1)."""
    run, reference, before = first_sgd_step
    state = run("sgd_channels_last", *FIRST_SGD_STEP, "module.channels_last=true")
    for part, (_, relative) in _compare_parts(reference, state, before, "channels-last").items():
        assert relative < 1e-4, part


def test_bf16_autocast_takes_the_same_step(first_sgd_step):
    """bf16-mixed computes the update fp32 computes, from the same weights, for every part that trains
    (the discriminator included).

    What is compared, and why:
    - One step. The first step starts from identical weights, so the two updates differ only by how bf16
      rounds that one gradient. After a few steps the tiny random model has amplified those differences
      along its trajectory by an amount that depends on the CPU's kernels: after three steps the encoder's
      updates had cosine 0.15 with one set of kernels and 0.71 with another (`ONEDNN_MAX_CPU_ISA=AVX2`).
    - Plain SGD. Its update is the gradient, so cosine and size compare gradients. AdamW's first update is
      lr x sign(gradient) for every weight, so a weight whose gradient is below bf16's rounding gets a full
      step in a random direction, and how many there are depends on the kernels (cosine 0.85 on one CPU, above
      0.9 on another); it also hides a gradient of the wrong size.
    - The GAN is on, so the discriminator and the adversarial term run in bf16 too.
    Expected spread: bf16 keeps 8 significant bits (rounding 2^-9 = 0.2 %). The reconstruction gradient
    alone comes out 3 % off (relative norm of the difference); through the discriminator's LeakyReLUs and
    GroupNorms the adversarial term comes out 25 % off, and the first step of each part 13 to 29 % off
    (cosine 0.96 to 0.99). That difference is bf16's rounding of the same float32 operands, the same on
    any CPU; the kernels only change the order of float32 sums, which moved it by under 0.001 under every
    kernel set of .ci/numerics. The bounds (0.5, 0.9) leave a margin of 1.7 and 2.7 over the worst part.
    Real errors are outside them: the adversarial term dropped (encoder 0.82), the reconstruction term
    doubled (decoder 0.65), the adversarial term doubled (encoder 0.78), every sign flipped (cosine -0.96)."""
    run, reference, before = first_sgd_step
    state = run("sgd_bf16", *FIRST_SGD_STEP, "trainer.precision=bf16-mixed")
    for part, (cosine, relative) in _compare_parts(reference, state, before, "bf16-mixed").items():
        assert cosine > 0.9 and relative < 0.5, part


def test_fused_adamw_takes_the_same_steps(baseline):
    """Fused AdamW through the module's sync-free path (non-finite steps skipped with found_inf, no host
    sync) takes the steps the default AdamW takes. Its arithmetic rounds differently, and AdamW turns
    those last bits in near-zero gradients into updates of size lr, so compared as update vectors."""
    run, reference, init = baseline
    default = _updates(reference, init, prefix="tokenizer.")
    fused = _updates(run("fused", "+optim.optimizer.fused=true"), init, prefix="tokenizer.")
    cosine = torch.nn.functional.cosine_similarity(default, fused, dim=0).item()
    relative = ((fused - default).norm() / default.norm()).item()
    print(f"fused vs default AdamW, all tokenizer updates after 3 steps: cosine {cosine:.5f}, relative {relative:.4f}")
    assert cosine > 0.99 and relative < 0.1
