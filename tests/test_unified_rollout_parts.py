"""The parts of one rollout (`unilip.tasks.unified.rollouts`), called directly: the reward's terms against hand
values, the source each rendering is scored against, the noise a group shares, chunked rendering, what the
generator is asked for, the condition rows, and the guided velocity with its gradient. The whole loop runs in
test_unified_training.py; here each part is checked where a mistake would still train, only wrongly."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests import sampling_helpers
from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.evaluation.similarity import ImageEncoder, ReconstructionSimilarity
from unilip.models.captioner import CaptionBatch
from unilip.tasks.unified import rollouts
from unilip.tasks.unified.rollouts import (
    Rendering,
    RewardTerms,
    SDESampling,
    TrainedParameters,
    caption_rollout,
    chunked,
    image_rollout,
    render_noise,
    reward,
    velocity_of,
)

GROUP = 2


# ---------------------------------------------------------------------------------------------- by hand
def test_chunked_calls_at_most_chunk_rows_and_concatenates_in_order():
    calls = []

    def function(a, b):
        calls.append(len(a))
        return a * 10 + b

    a, b = torch.arange(5), torch.arange(5) + 100
    whole = a * 10 + b
    for chunk, sizes in [(None, [5]), (2, [2, 2, 1]), (3, [3, 2]), (5, [5]), (7, [5]), (1, [1] * 5)]:
        calls.clear()
        assert torch.equal(chunked(function, chunk, a, b), whole), chunk
        assert calls == sizes, chunk


class Channels(nn.Module):
    """A stand-in encoder model: the pooled feature of an image is the mean of two of its channels."""

    def __init__(self, channels: tuple[int, int]):
        super().__init__()
        self.channels, self.unused = list(channels), nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        return SimpleNamespace(pooled=pixel_values[:, self.channels].mean(dim=(2, 3)))


def flat(colours) -> torch.Tensor:
    """(N, 3, 4, 4) images of one colour each."""
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 4, 4).contiguous()


def two_channel_similarity() -> ReconstructionSimilarity:
    identity = lambda images: images  # noqa: E731
    channels = {"a": (0, 1), "b": (1, 2)}
    encoders = [ImageEncoder(name, Channels(pair), "pooled", identity) for name, pair in channels.items()]
    return ReconstructionSimilarity(encoders, [0.25, 2.0])


def test_the_reward_is_the_weighted_similarity_plus_length_and_format_by_hand():
    similarity = two_channel_similarity()
    sources, rendered = flat([[1, 0, 1], [1, 1, 1]]), flat([[1, 1, 0], [1, 1, 1]])
    # encoder a sees (R, G): (1, 0) vs (1, 1) -> cos 1/sqrt(2), then equal -> 1; encoder b sees (G, B): (0, 1) vs
    # (1, 0) -> 0, then 1
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # 3 and 6 tokens
    captions = CaptionBatch(mask.long(), mask, torch.tensor([True, False]), torch.zeros(2, 6))
    terms = RewardTerms(length_weight=0.5, length_target=4, format_weight=0.3)
    total, parts = reward(similarity, sources, rendered, captions, terms)
    assert set(parts) == {"sim/a", "sim/b", "length", "format"}
    torch.testing.assert_close(parts["sim/a"], torch.tensor([1 / math.sqrt(2), 1.0]))
    torch.testing.assert_close(parts["sim/b"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(parts["length"], torch.tensor([0.5 * 3 / 4, 0.5]))  # 6 tokens: capped at 1
    torch.testing.assert_close(parts["format"], torch.tensor([0.3, 0.0]))  # the second was cut off
    expected = torch.tensor([0.25 / math.sqrt(2) + 0.375 + 0.3, 0.25 + 2.0 + 0.5])
    torch.testing.assert_close(total, expected)
    assert total.dtype == torch.float32
    # without captions (stage 2): the weighted similarity alone
    total, parts = reward(similarity, sources, rendered, None, terms)
    assert set(parts) == {"sim/a", "sim/b"}
    torch.testing.assert_close(total, torch.tensor([0.25 / math.sqrt(2), 2.25]))


def test_the_starting_noise_is_the_hosts_gaussian_on_the_latent_grid():
    networks = SimpleNamespace(latents=SimpleNamespace(channels=3))
    for size, side in [(448, 16), (56, 2), (57, 3)]:  # 28 pixels a latent, the last one partial
        noise = render_noise(networks, 5, size, torch.Generator().manual_seed(4))
        assert noise.shape == (5, 3, side, side) and noise.dtype == torch.float32 and noise.device.type == "cpu"
        assert torch.equal(noise, torch.randn((5, 3, side, side), generator=torch.Generator().manual_seed(4)))


def test_trained_parameters_keep_their_names_and_refuse_nothing():
    named = {"captioner.model.layers.0.lora_A": nn.Parameter(torch.ones(2)), "dit.bias": nn.Parameter(torch.zeros(3))}
    trained = TrainedParameters(named)
    assert trained.named() == named
    assert all(trained.named()[name] is param for name, param in named.items())
    assert [name for name, _ in trained.named_parameters()] == ["captioner__model__layers__0__lora_A", "dit__bias"]
    with pytest.raises(ValueError, match=r"^nothing to train$"):
        TrainedParameters({})


class Forward(nn.Module):
    """A DiT forward whose output is linear in one weight w: w c x + t / 1000, c the condition's one number per
    row; its output is bfloat16, as a DiT's under autocast."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.5))
        self.calls = []

    def forward(self, x, timestep, condition, mask):
        self.calls.append((x.shape[0], timestep.clone(), condition.clone(), mask.clone()))
        return (self.w * condition.view(-1, 1) * x + timestep.view(-1, 1) / 1000).bfloat16()


def test_the_guided_velocity_and_which_branch_takes_the_gradient_by_hand():
    x, t = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([0.5, 0.25])
    scale = 4.0
    # unguided: one forward at t x 1000 with the condition as given, in float32
    forward = Forward()
    velocity = velocity_of(forward, torch.tensor([2.0, 3.0]), torch.ones(2, 1), scale)(x, t)
    assert velocity.dtype == torch.float32 and len(forward.calls) == 1
    rows, timestep, _, _ = forward.calls[0]
    assert rows == 2 and torch.equal(timestep, torch.tensor([500.0, 250.0]))
    torch.testing.assert_close(velocity, 1.5 * torch.tensor([[2.0], [3.0]]) * x + t.view(-1, 1), rtol=1e-2, atol=0)
    # guided: the prompt rows (c = 2) then the null rows (c = 0.5) in one forward of x twice
    condition = torch.tensor([2.0, 2.0, 0.5, 0.5])
    mask = torch.tensor([[1], [1], [0], [0]])
    for null_gradient, slope in [(False, scale * 2.0), (True, scale * 2.0 + (1 - scale) * 0.5)]:
        forward = Forward()
        extra = (True,) if null_gradient else ()  # the default: no gradient through the null rows
        velocity = velocity_of(forward, condition, mask, scale, *extra)(x, t)
        rows, timestep, seen_condition, seen_mask = forward.calls[0]
        assert len(forward.calls) == 1 and rows == 4
        assert torch.equal(timestep, torch.tensor([500.0, 250.0, 500.0, 250.0]))
        assert torch.equal(seen_condition, condition) and torch.equal(seen_mask, mask)
        conditional, null = 1.5 * 2.0 * x + t.view(-1, 1), 1.5 * 0.5 * x + t.view(-1, 1)
        torch.testing.assert_close(velocity, null + scale * (conditional - null), rtol=2e-2, atol=2e-2)
        # d/dw of the velocity's sum: s c_cond sum(x) through the prompt rows; (1 - s) c_null sum(x) through the
        # null rows only when they take the gradient (Flow-GRPO detaches them)
        (gradient,) = torch.autograd.grad(velocity.sum(), forward.w)
        assert gradient.item() == pytest.approx(slope * x.sum().item(), rel=1e-2), null_gradient


# ---------------------------------------------------------------------------------------------- real networks
def build(photos_dir, generator_dir, runs, stage: int, *extra: str):
    from unilip.tasks.unified.setup import build_unified_training

    cfg = compose_train(
        [
            "experiment=unified/quickstart",
            f"stage={stage}",
            f"paths.data_dir={photos_dir}",
            f"paths.runs_dir={runs}",
            f"run_dir={runs / f'stage{stage}'}",
            f"generator_from={generator_dir}",
            "captioner_from=base",
            "captioner.max_new_tokens=4",
            f"module.group_size={GROUP}",
            *extra,
        ]
    )
    return build_unified_training(cfg)


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return sampling_helpers.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


@pytest.fixture(scope="module")
def caption_module(tmp_path_factory, photos_dir, generator_dir):
    return build(photos_dir, generator_dir, tmp_path_factory.mktemp("runs"), 1)


@pytest.fixture(scope="module")
def image_module(tmp_path_factory, photos_dir, generator_dir):
    return build(photos_dir, generator_dir, tmp_path_factory.mktemp("runs"), 2)


@pytest.fixture(scope="module")
def caption_networks(caption_module):
    return caption_module.networks


@pytest.fixture(scope="module")
def image_networks(image_module):
    return image_module.networks


def test_each_trained_parameter_is_found_by_its_name_in_the_task(caption_module, image_module):
    """`captioner.<name in the LLM>` (stage 1's adapters) and `dit.<name in the DiT>` (stage 2's) name the very
    parameters the stage trains (what sharding and checkpoints look them up by)."""
    for module, owner in [(caption_module, "captioner."), (image_module, "dit.")]:
        named = module.trained.named()
        assert named and all(name.startswith(owner) for name in named)
        for name, param in named.items():
            assert module.networks.trained_parameter(name) is param, name
    with pytest.raises(KeyError):
        caption_module.networks.trained_parameter("llm.model.embed_tokens.weight")


def test_the_rendering_pipeline_is_the_networks_with_their_flow_shift(caption_networks, monkeypatch):
    monkeypatch.setattr(caption_networks, "flow_shift", 1.7)
    pipe = caption_networks.pipeline("euler")
    assert (pipe.scheduler, pipe.flow_shift) == ("euler", 1.7)
    assert pipe.generator is caption_networks.generator and pipe.latents is caption_networks.latents
    assert pipe.conditioner is caption_networks.conditioner


def sources() -> torch.Tensor:
    """Two different images in [0, 1]."""
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    images[1] = images[1] ** 3
    return images


def assert_each_row_scored_against_its_own_source(networks, rollout):
    """Row r of B x G is image r // G's: its reward is the similarity of that pair alone."""
    for row in range(len(rollout.rewards)):
        source = rollout.images[row // GROUP : row // GROUP + 1]
        scores = networks.similarity(source, rollout.rendered[row : row + 1])
        for name, value in scores.items():
            torch.testing.assert_close(rollout.terms[f"sim/{name}"][row : row + 1], value, rtol=1e-5, atol=1e-6)
    # the pairing matters: the renderings score otherwise against the other image (else the check could not tell)
    swapped = networks.similarity(rollout.images.flip(0).repeat_interleave(GROUP, dim=0), rollout.rendered)
    assert any(not torch.allclose(swapped[name], rollout.terms[f"sim/{name}"]) for name in swapped)


class PipelineSpy:
    """Records what the generator is asked to render (texts, settings, the noise), and renders it."""

    def __init__(self, networks):
        self.networks, self.calls = networks, []

    def __call__(self, scheduler="dpm"):
        pipe = type(self.networks).pipeline(self.networks, scheduler)

        def call(texts, **kwargs):
            self.calls.append({"scheduler": scheduler, "texts": texts, **kwargs})
            return pipe(texts, **kwargs)

        return call


def test_a_caption_rollout_renders_each_caption_with_its_images_noise_and_scores_it_against_that_image(
    caption_networks, monkeypatch
):
    networks, images = caption_networks, sources()
    spy = PipelineSpy(networks)
    monkeypatch.setattr(networks, "pipeline", spy)
    rendering = Rendering(steps=2, guidance_scale=3.0, scheduler="euler", size=56, shared_noise=True)
    terms = RewardTerms(length_weight=0.5, length_target=2, format_weight=0.25)
    rollout = caption_rollout(networks, images, GROUP, torch.Generator().manual_seed(3), rendering, terms)
    count = len(images) * GROUP
    assert torch.equal(rollout.images, images) and rollout.features.shape[0] == len(images)
    torch.testing.assert_close(rollout.features, networks.captioner.image_features(images))
    assert rollout.captions.tokens.shape[0] == count and len(rollout.texts) == count
    assert rollout.texts == networks.captioner.decode(rollout.captions)
    assert rollout.rendered.shape == (count, 3, 56, 56) and 0 <= rollout.rendered.min() <= rollout.rendered.max() <= 1
    assert rollout.trajectory is None and rollout.condition is None
    # the generator renders the sampled captions, with the rendering's settings, from one noise per image
    (call,) = spy.calls
    assert call["texts"] == rollout.texts and call["scheduler"] == "euler"
    assert (call["guidance_scale"], call["num_inference_steps"], call["size"]) == (3.0, 2, 56)
    noise = call["noise"]
    assert noise.shape == (count, networks.latents.channels, 2, 2)
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3]) and not torch.equal(noise[0], noise[2])
    # the reward: each rendering against its own image, plus the caption terms of its own caption
    assert_each_row_scored_against_its_own_source(networks, rollout)
    lengths = rollout.captions.mask.sum(1).float()
    torch.testing.assert_close(rollout.terms["length"], 0.5 * torch.clamp(lengths / 2, max=1))
    torch.testing.assert_close(rollout.terms["format"], 0.25 * rollout.captions.finished.float())
    weights = networks.similarity.weights
    similarity = sum(weights[name] * rollout.terms[f"sim/{name}"] for name in weights)
    torch.testing.assert_close(rollout.rewards, similarity + rollout.terms["length"] + rollout.terms["format"])
    # the same seed gives the same rollout; each caption's own noise when the group does not share it
    again = caption_rollout(networks, images, GROUP, torch.Generator().manual_seed(3), rendering, terms)
    assert again.texts == rollout.texts and torch.equal(again.rendered, rollout.rendered)
    spy.calls.clear()
    rendering.shared_noise = False
    for _ in range(2):  # from the rollout's generator alone
        torch.manual_seed(len(spy.calls))
        caption_rollout(networks, images, GROUP, torch.Generator().manual_seed(3), rendering, terms)
    noise = spy.calls[0]["noise"]
    assert noise.shape[0] == count and len({tuple(row.flatten().tolist()) for row in noise}) == count
    assert torch.equal(spy.calls[1]["noise"], noise)


def test_a_chunked_caption_rollout_renders_a_chunk_at_a_time_and_gives_the_same_result(caption_networks, monkeypatch):
    networks, images = caption_networks, sources()
    rendering, terms = Rendering(steps=2, scheduler="euler", size=56), RewardTerms()
    whole = caption_rollout(networks, images, GROUP, torch.Generator().manual_seed(5), rendering, terms)
    spy = PipelineSpy(networks)
    monkeypatch.setattr(networks, "pipeline", spy)
    chunked_rollout = caption_rollout(networks, images, GROUP, torch.Generator().manual_seed(5), rendering, terms, 3)
    assert [len(call["texts"]) for call in spy.calls] == [3, 1]
    assert [text for call in spy.calls for text in call["texts"]] == whole.texts == chunked_rollout.texts
    torch.testing.assert_close(chunked_rollout.rendered, whole.rendered, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_rollout.rewards, whole.rewards, rtol=0, atol=1e-5)


def test_an_image_rollout_samples_a_group_of_images_of_one_caption_and_scores_each_against_the_source(
    image_networks, monkeypatch
):
    networks, images = image_networks, sources()
    sampling = SDESampling(steps=3, noise_level=0.7, guidance_scale=4.5, size=57)  # 3 latents, decoded to 84 px
    count = len(images) * GROUP
    seen = []
    real_sample_sde = rollouts.sample_sde

    def spy(velocity, noise, times, noise_level, generator):
        seen.append({"noise": noise, "times": times, "noise_level": noise_level})
        return real_sample_sde(velocity, noise, times, noise_level, generator)

    monkeypatch.setattr(rollouts, "sample_sde", spy)
    rollout = image_rollout(networks, images, GROUP, torch.Generator().manual_seed(7), sampling, flow_shift=3.0)
    # one caption per image (the frozen captioner's, greedy), each repeated for the G samples of its group
    captions = networks.captioner.decode(rollout.captions)
    assert rollout.captions.tokens.shape[0] == len(images) and len(captions) == len(images)
    assert rollout.texts == [captions[0], captions[0], captions[1], captions[1]]
    # guided: the N prompt rows, then N null rows that are all the same null prompt
    condition, mask = rollout.condition
    assert condition.shape[0] == mask.shape[0] == 2 * count
    assert all(torch.equal(condition[count], condition[row]) for row in range(count, 2 * count))
    assert not torch.equal(condition[0], condition[count])
    # the SDE: N noises on the latent grid, the shifted times, the noise level asked for
    (call,) = seen
    assert call["noise"].shape == (count, networks.latents.channels, 3, 3) and call["noise_level"] == 0.7
    times = call["times"]
    # diffusers' flow-matching schedule at shift s = 3 (t -> s t / (1 + (s - 1) t)): 3 steps evenly from 1 to its
    # smallest training sigma, shift(0.001), each shifted once more, then 0
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    low = shift(0.001)
    expected = [1.0, shift((1 + low) / 2), shift(low), 0.0]
    assert [float(t) for t in times] == pytest.approx(expected, rel=1e-5)
    trajectory = rollout.trajectory
    assert len(trajectory.latents) == 4 and torch.equal(trajectory.latents[0], call["noise"])
    decoded = networks.latents.decode(trajectory.samples, (57, 57)).float().clamp(0, 1)
    torch.testing.assert_close(rollout.rendered, decoded)
    assert rollout.rendered.shape == (count, 3, 57, 57)
    torch.testing.assert_close(rollout.features, networks.captioner.image_features(images))
    assert set(rollout.terms) == {f"sim/{name}" for name in networks.similarity.names}
    assert_each_row_scored_against_its_own_source(networks, rollout)
    weights = networks.similarity.weights
    torch.testing.assert_close(rollout.rewards, sum(weights[name] * rollout.terms[f"sim/{name}"] for name in weights))
    # greedy captions do not depend on the seed; the images do, and only on it
    other = image_rollout(networks, images, GROUP, torch.Generator().manual_seed(8), sampling, flow_shift=3.0)
    assert other.texts == rollout.texts and not torch.allclose(other.rendered, rollout.rendered)
    torch.manual_seed(123)  # the global generator plays no part
    again = image_rollout(networks, images, GROUP, torch.Generator().manual_seed(7), sampling, flow_shift=3.0)
    assert torch.equal(again.rendered, rollout.rendered) and torch.equal(again.trajectory.latents, trajectory.latents)
    # sampled captions come from the rollout's generator too
    sampled = [
        image_rollout(networks, images, GROUP, torch.Generator().manual_seed(9), sampling, 3.0, greedy_captions=False)
        for _ in range(2)
    ]
    assert torch.equal(sampled[0].captions.tokens, sampled[1].captions.tokens)
    assert torch.equal(sampled[0].rendered, sampled[1].rendered)
    # without guidance, only the prompt rows
    sampling.guidance_scale = 1.0
    unguided = image_rollout(networks, images, GROUP, torch.Generator().manual_seed(7), sampling, flow_shift=3.0)
    assert unguided.condition[0].shape[0] == count
    torch.testing.assert_close(unguided.condition[0], condition[:count])
