"""Sampling: sizes, seeds, schedulers and classifier-free guidance, on the tiny generator."""

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.models.generator import UniLIPGenerator, build_dit
from unilip.models.latents import UniLIPLatents
from unilip.models.mllm import build_conditioner
from unilip.pipelines import UniLIPPipeline


@pytest.fixture(scope="module")
def pipe(tiny_config):
    from unilip.models import UniLIPTokenizer

    cfg = compose_train(["experiment=generate/quickstart", "stage=2", "run_dir=/tmp/unused"])
    mllm = instantiate(cfg.mllm)
    torch.manual_seed(0)
    tokenizer = UniLIPTokenizer(tiny_config).eval()
    conditioner = build_conditioner(mllm, tokenizer)
    generator = UniLIPGenerator.from_language_model(conditioner.language_model, build_dit(instantiate(cfg.dit)), 8, 2)
    latents = UniLIPLatents(tokenizer, 4.5)  # unit-ish variance for the random tiny tokenizer
    return UniLIPPipeline(generator.eval(), conditioner, latents)


def test_latents_encode_then_decode_is_the_tokenizers_own_round_trip(tiny_config):
    """UniLIPLatents scales the tokenizer's latents for the DiT and undoes it before decoding: its
    encode -> decode of a photo is the tokenizer's own encode -> decode of it (a scale on one side only would
    decode latents 4.5 times too large or too small), and its latents are 4.5 times the tokenizer's."""
    from skimage import data

    from unilip.models import UniLIPTokenizer

    torch.manual_seed(0)
    tokenizer = UniLIPTokenizer(tiny_config).eval()
    latents = UniLIPLatents(tokenizer, 4.5)
    photo = torch.from_numpy(data.astronaut()[::9, ::9][:56, :56].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        own = tokenizer.encode(photo)
        expected = tokenizer.decode(own, size=(56, 56))
    scaled = latents.encode(photo)
    assert torch.allclose(scaled, 4.5 * own, rtol=1e-6, atol=0)
    decoded = latents.decode(scaled, (56, 56))
    # the only rounding: x * 4.5 / 4.5 (an ulp of each latent) through the decoder; a missing 4.5 moves it by ~0.1
    assert decoded.shape == expected.shape == (1, 3, 56, 56)
    assert torch.allclose(decoded, expected, rtol=0, atol=1e-5)


PROMPTS = ["a red motorcycle parked in a garage", "a close-up of a tabby cat"]


@pytest.mark.parametrize("scheduler", ["dpm", "euler"])
def test_images_have_the_requested_size_and_a_seed_fixes_them(pipe, scheduler):
    first = pipe(PROMPTS, size=56, num_inference_steps=3, seed=7, scheduler=scheduler)
    assert first.shape == (2, 3, 56, 56) and first.min() >= 0 and first.max() <= 1
    again = pipe(PROMPTS, size=56, num_inference_steps=3, seed=7, scheduler=scheduler)
    assert torch.equal(first, again)
    other = pipe(PROMPTS, size=56, num_inference_steps=3, seed=8, scheduler=scheduler)
    assert (other - first).abs().max() > 1e-3
    assert pipe(PROMPTS[:1], size=112, num_inference_steps=2, scheduler=scheduler).shape == (1, 3, 112, 112)


def test_editing_returns_the_requested_size_and_depends_on_the_source(pipe):
    torch.manual_seed(3)
    source = torch.rand(1, 3, 70, 90)
    edited = pipe(["make it black and white"], source, size=84, num_inference_steps=2)
    assert edited.shape == (1, 3, 84, 84)
    other = pipe(["make it black and white"], torch.rand(1, 3, 70, 90), size=84, num_inference_steps=2)
    assert (other - edited).abs().max() > 1e-4


def test_guidance_scale_one_is_the_conditional_prediction_alone(pipe):
    conditioner, generator = pipe.conditioner, pipe.generator
    both = conditioner.prepare(PROMPTS * 2, [False] * 4, [False, False, True, True], 8)
    alone = conditioner.prepare(PROMPTS, [False] * 2, [False] * 2, 8)  # no null rows, shorter padding
    latents, t = torch.randn(2, 32, 2, 2), torch.tensor(600.0)
    with torch.no_grad():
        condition = generator.condition(conditioner, both, None)
        guided = pipe.guided_velocity(latents, t, condition, both.attention_mask, scale=1.0)
        conditional = generator(
            latents, t.expand(2), generator.condition(conditioner, alone, None), alone.attention_mask
        )
        null = generator(latents, t.expand(2), condition[2:], both.attention_mask[2:])
        assert torch.allclose(guided, conditional, atol=1e-5)
        stronger = pipe.guided_velocity(latents, t, condition, both.attention_mask, scale=4.5)
        assert torch.allclose(stronger, null + 4.5 * (conditional - null), atol=1e-4)
        assert (stronger - conditional).abs().max() > 1e-3
