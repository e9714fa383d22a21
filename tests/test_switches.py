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
    assert worst < 1e-5


def _updates(state, init, prefix="tokenizer.decoder."):
    """The decoder's weight change over the run, flattened (state dict vs the initial tokenizer)."""
    return torch.cat(
        [
            (state[k].float() - init[k[len("tokenizer.") :]].float()).flatten()
            for k in sorted(state)
            if k.startswith(prefix)
        ]
    )


def test_bf16_autocast_takes_the_same_steps(baseline):
    """bf16-mixed moves the decoder the way fp32 does. Compared as update vectors (cosine, relative size),
    because three AdamW steps move any weight by about the sum of the learning rates whatever the
    gradient: a run with the loss negated would be as close in weights as bf16 is, but point the
    other way (a negative cosine)."""
    run, reference, init = baseline
    fp32, bf16 = _updates(reference, init), _updates(run("bf16", "trainer.precision=bf16-mixed"), init)
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0).item()
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    print(f"bf16-mixed vs fp32 decoder updates after 3 steps: cosine {cosine:.4f}, relative difference {relative:.3f}")
    assert cosine > 0.9 and relative < 0.5


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
