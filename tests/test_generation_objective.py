"""The generation objective on its own, at tiny size: the rectified-flow loss against a direct computation,
classifier-free-guidance prompt dropout at its rate, the logit-normal timestep density."""

import math

import pytest
import torch

from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture(scope="module")
def module(tmp_path_factory, tiny_config, photos_dir):
    from unilip.models import UniLIPTokenizer
    from unilip.tasks.generation.setup import build_generation_training

    root = tmp_path_factory.mktemp("objective")
    torch.manual_seed(0)
    UniLIPTokenizer(tiny_config).save_pretrained(root / "tokenizer")
    cfg = compose_train(
        [
            "experiment=generate/quickstart",
            "stage=1",  # connector alignment: targets in the DC-AE latents, the same objective
            f"tokenizer_from={root / 'tokenizer'}",
            f"paths.data_dir={photos_dir}",
            f"paths.runs_dir={root}",
            f"run_dir={root / 'run'}",
            "module.logit_mean=0.5",
            "module.logit_std=0.8",
        ]
    )
    module = build_generation_training(cfg)
    module.frozen.to(torch.device("cpu"))
    return module.eval()


def _batch(count, size=64, edits=0):
    torch.manual_seed(1)
    return {
        "image": torch.rand(count, 3, size, size),
        "source_image": torch.rand(count, 3, size, size),
        "has_source": torch.arange(count) < edits,
        "caption": [f"a photo of thing number {i}" for i in range(count)],
        "key": [str(i) for i in range(count)],
    }


def test_flow_loss_is_the_rectified_flow_objective(module):
    """x_t = (1 - t) x0 + t n, target n - x0, the DiT asked at 1000 t: recomputed here from the model's
    parts, for an edit and a text-to-image sample at two different times."""
    batch = _batch(2, edits=1)
    with torch.no_grad():
        x0, prompt, features = module.inputs(batch, drop=False)
        t = torch.tensor([0.3, 0.8])
        noise = torch.randn_like(x0)
        loss = module.flow_loss(x0, prompt, features, t, noise)
        condition = module.generator.condition(module.conditioner, prompt, features)
        x_t = torch.stack([(1 - 0.3) * x0[0] + 0.3 * noise[0], (1 - 0.8) * x0[1] + 0.8 * noise[1]])
        velocity = module.generator(x_t, torch.tensor([300.0, 800.0]), condition, prompt.attention_mask)
        expected = ((velocity - (noise - x0)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert x0.shape[1] == 32 and features.shape[0] == 1  # latents of the targets; features of the one edit source


def _null_rows(module, batch, drop):
    """Which prompts of `module.inputs(batch, drop)` are the null (empty) prompt."""
    _, prompt, _ = module.inputs(batch, drop=drop)
    count = len(batch["caption"])
    q = module.generator.config.num_queries
    null = module.conditioner.prepare(batch["caption"], batch["has_source"], torch.ones(count, dtype=torch.bool), q)
    rows = []
    for i in range(count):
        mine = prompt.input_ids[i][prompt.attention_mask[i]]
        empty = null.input_ids[i][null.attention_mask[i]]
        rows.append(mine.shape == empty.shape and torch.equal(mine, empty))
    return torch.tensor(rows)


def test_cfg_dropout_replaces_prompts_by_the_null_prompt_at_its_rate(module):
    """10 % of training prompts become the null prompt (4 sigma band over 400 prompts); none in validation."""
    batch = _batch(400, size=32)
    module.rng.manual_seed(0)
    rate = _null_rows(module, batch, drop=True).float().mean().item()
    assert 0.1 - 4 * math.sqrt(0.09 / 400) < rate < 0.1 + 4 * math.sqrt(0.09 / 400)
    assert not _null_rows(module, batch, drop=False).any()


def test_timesteps_are_logit_normal_with_the_configured_mean_and_std(module):
    module.rng.manual_seed(0)
    t = module.sample_timesteps(20000)
    assert ((t > 0) & (t < 1)).all()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03) and logit.std().item() == pytest.approx(0.8, abs=0.02)


def test_timesteps_and_cfg_dropout_come_from_the_modules_own_generator(module):
    """The module's generator (saved with checkpoints for exact resume) draws both, not torch's global one."""
    batch = _batch(64, size=32)
    draws = []
    for global_seed in (0, 1):
        module.rng.manual_seed(5)
        torch.manual_seed(global_seed)
        draws.append((module.sample_timesteps(32), _null_rows(module, batch, drop=True)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert draws[0][1].any()  # 64 prompts at 10 %: some were dropped (seed 5)


def test_inputs_of_a_cached_batch_are_the_cached_tensors(module, monkeypatch):
    """A batch from a latent cache carries x0 and the edits' source features: they are returned as they are,
    and neither frozen encoder runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran on a cached batch")

    monkeypatch.setattr(module.latents, "encode", refuse)
    monkeypatch.setattr(module.conditioner, "image_features", refuse)
    batch = _batch(3, size=32, edits=1)
    del batch["image"], batch["source_image"]
    batch["latent"] = torch.randn(3, 32, 2, 2, dtype=torch.bfloat16)
    batch["source_features"] = torch.randn(1, 4, 8)
    x0, _, features = module.inputs(batch, drop=False)
    assert x0.dtype == torch.float32 and torch.equal(x0, batch["latent"].float())
    assert features is batch["source_features"]


def test_a_text_to_image_batch_has_no_source_features(module):
    """No edit in the batch (and a batch without edit flags at all): the condition gets no source features."""
    batch = _batch(2, size=32)
    assert module.inputs(batch, drop=False)[2] is None
    del batch["has_source"]
    x0, prompt, features = module.inputs(batch, drop=False)
    assert features is None and x0.shape[0] == 2 and prompt.input_ids.shape[0] == 2
