"""One rollout of each step of the unified loop (UAE's Unified-GRPO), on the networks the task holds.

Generation for understanding (stage 1): the captioner samples G captions of each image; the frozen generator
renders each (ODE sampler, as it is used); the reward is the rendering's similarity to the image.

Understanding for generation (stage 2): the frozen captioner writes one caption of each image; the generator
samples G images of it with the SDE sampler (each step has a log-probability, `unilip.pipelines.flow_sde`);
the reward is each image's similarity to the source.

Rollouts are batched (all B x G at once, `chunk` rows at a time where memory asks for it) and run on the
device the networks are on; their randomness comes from one host generator (reproducible, resumable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unilip.evaluation.similarity import ReconstructionSimilarity
from unilip.models.captioner import CaptionBatch, Captioner
from unilip.models.generator import UniLIPGenerator
from unilip.models.latents import latent_grid
from unilip.models.mllm import DualConditioner
from unilip.pipelines.flow_sde import Trajectory, Velocity, sample_sde, sde_times
from unilip.pipelines.generation import UniLIPPipeline
from unilip.training.frozen import FrozenNetworks


@dataclass
class RewardTerms:
    """Terms added to the similarity in stage 1 (captions): length and format (0: off).

    length: `length_weight` x min(tokens / `length_target`, 1); format: `format_weight` if the caption ended
    with the stop token (a caption cut at max_new_tokens gets 0).
    """

    length_weight: float = 0.0
    length_target: int = 128
    format_weight: float = 0.0


@dataclass
class Rendering:
    """How the frozen generator renders captions in stage 1 and in validation (its ODE sampler).

    `shared_noise`: the G captions of one image are rendered from the same noise, so that their rewards differ
    by the captions alone (common random numbers); False: each rendering draws its own.
    """

    steps: int = 20
    guidance_scale: float = 4.5
    scheduler: str = "dpm"
    size: int = 448
    shared_noise: bool = True


@dataclass
class SDESampling:
    """How the generator samples in stage 2: SDE steps, noise level a, guidance (Flow-GRPO: 10, 0.7, 4.5)."""

    steps: int = 10
    noise_level: float = 0.7
    guidance_scale: float = 4.5
    size: int = 448


@dataclass(eq=False)
class UnifiedNetworks(FrozenNetworks):
    """The networks of both steps. They live outside the module tree (rebuilt from their sources); the
    parameters a stage trains (adapters, or the DiT) are registered in the tree by `UnifiedTraining`."""

    captioner: Captioner
    generator: UniLIPGenerator
    conditioner: DualConditioner
    latents: nn.Module
    similarity: ReconstructionSimilarity
    reference_dit: nn.Module | None = None  # the DiT before training, for the KL of a fully trained DiT
    flow_shift: float = 3.0

    def trained_parameter(self, name: str) -> nn.Parameter:
        """A trained parameter by its name in the task: `captioner.<name in the LLM>` or `dit.<name in the DiT>`
        (after FSDP sharding: the sharded parameter that now stands there)."""
        owner, _, rest = name.partition(".")
        networks = {"captioner": self.captioner.language_model, "dit": self.generator.dit}
        return networks[owner].get_parameter(rest)

    def pipeline(self, scheduler: str) -> UniLIPPipeline:
        return UniLIPPipeline(self.generator, self.conditioner, self.latents, scheduler, self.flow_shift)


class TrainedParameters(nn.Module):
    """The parameters a stage trains, registered under their names in the network that uses them ('.' -> '__')."""

    def __init__(self, named: dict[str, nn.Parameter]):
        super().__init__()
        if not named:
            raise ValueError("nothing to train")
        for name, param in named.items():
            self.register_parameter(name.replace(".", "__"), param)

    def named(self) -> dict[str, nn.Parameter]:
        return {name.replace("__", "."): param for name, param in self.named_parameters()}


@dataclass
class Rollout:
    """What one rollout produced, for the loss and the logs. N = B x G rows, each image's G consecutive."""

    images: torch.Tensor  # (B, 3, H, W) the sources
    features: torch.Tensor  # (B, N_img, D) their encoder features (the captioner's input)
    captions: CaptionBatch  # (N, T) stage 1: the sampled captions; stage 2: (B, T) the frozen captioner's
    texts: list[str]  # N caption texts
    rendered: torch.Tensor  # (N, 3, S, S) in [0, 1]
    rewards: torch.Tensor  # (N,)
    terms: dict[str, torch.Tensor]  # reward terms by name, (N,) each
    trajectory: Trajectory | None = None  # stage 2: the SDE samples
    condition: tuple[torch.Tensor, torch.Tensor] | None = None  # stage 2: the DiT's condition and mask (2N rows)


def chunked(function: Callable[..., torch.Tensor], chunk: int | None, *rows) -> torch.Tensor:
    """`function(*rows)` on at most `chunk` rows at a time (None: all at once), concatenated."""
    count = len(rows[0])
    if chunk is None or chunk >= count:
        return function(*rows)
    return torch.cat([function(*(r[i : i + chunk] for r in rows)) for i in range(0, count, chunk)])


def reward(
    similarity: ReconstructionSimilarity,
    sources: torch.Tensor,
    rendered: torch.Tensor,
    captions: CaptionBatch | None,
    terms: RewardTerms,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N,) total reward and its terms: the similarity under each encoder (`sim/<name>`, weighted in the
    total by its weight), and with `captions` the length and format terms."""
    scores = similarity(sources, rendered)
    parts = {f"sim/{name}": value.float() for name, value in scores.items()}
    total = similarity.weighted(scores).float()
    if captions is not None:
        length = captions.lengths.float().to(total.device)
        parts["length"] = terms.length_weight * (length / terms.length_target).clamp(max=1.0)
        parts["format"] = terms.format_weight * captions.finished.float().to(total.device)
        total = total + parts["length"] + parts["format"]
    return total, parts


def render_noise(networks: UnifiedNetworks, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, C, h, w) starting noise for images of side `size`, drawn on the host from `generator`."""
    side = latent_grid(size)
    return torch.randn((count, networks.latents.channels, side, side), generator=generator)


def render(
    networks: UnifiedNetworks, texts: list[str], noise: torch.Tensor, rendering: Rendering, chunk: int | None
) -> torch.Tensor:
    """Captions -> (N, 3, S, S) images in [0, 1] from the generator's ODE sampler, starting from `noise`."""
    pipe = networks.pipeline(rendering.scheduler)
    indices = torch.arange(len(texts))

    def one(index: torch.Tensor) -> torch.Tensor:
        return pipe(
            [texts[i] for i in index.tolist()],
            guidance_scale=rendering.guidance_scale,
            num_inference_steps=rendering.steps,
            size=rendering.size,
            noise=noise[index],
        )

    return chunked(one, chunk, indices)


def caption_rollout(
    networks: UnifiedNetworks,
    images: torch.Tensor,
    group: int,
    generator: torch.Generator,
    rendering: Rendering,
    terms: RewardTerms,
    chunk: int | None = None,
) -> Rollout:
    """Stage 1: G sampled captions per image, rendered by the frozen generator, scored against the image."""
    captioner = networks.captioner
    features = captioner.image_features(images)
    captions = captioner.sample(features.repeat_interleave(group, dim=0), generator)
    texts = captioner.decode(captions)
    if rendering.shared_noise:
        noise = render_noise(networks, len(images), rendering.size, generator).repeat_interleave(group, dim=0)
    else:
        noise = render_noise(networks, len(texts), rendering.size, generator)
    rendered = render(networks, texts, noise, rendering, chunk)
    total, parts = reward(networks.similarity, images.repeat_interleave(group, dim=0), rendered, captions, terms)
    return Rollout(images, features, captions, texts, rendered, total, parts)


def condition(networks: UnifiedNetworks, texts: list[str], guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT's condition of `texts` (N rows; with guidance then the N null rows): ((R, L, C), (R, L) mask)."""
    count = len(texts)
    null = torch.zeros(count, dtype=torch.bool)
    prompts = texts
    if guided:
        null, prompts = torch.cat([null, torch.ones(count, dtype=torch.bool)]), texts * 2
    device = networks.generator.queries.device
    batch = networks.conditioner.prepare(
        prompts, torch.zeros(len(prompts), dtype=torch.bool), null, networks.generator.config.num_queries
    ).to(device)
    with torch.no_grad():
        return networks.generator.condition(networks.conditioner, batch, None), batch.attention_mask


def velocity_of(
    dit_forward: Callable, condition: torch.Tensor, mask: torch.Tensor, scale: float, null_gradient: bool = False
) -> Velocity:
    """The (guided) velocity v(x, t) of a DiT forward `dit_forward(x, timestep x 1000, condition, mask)`.

    With guidance, the null prompt's prediction is detached unless `null_gradient`: the policy gradient then
    flows through the conditional branch alone, as in Flow-GRPO (train_sd3.py, `compute_log_prob`).
    """

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if condition.shape[0] == x.shape[0]:  # unguided
            return dit_forward(x, t * 1000, condition, mask).float()
        both = dit_forward(torch.cat([x, x]), torch.cat([t, t]) * 1000, condition, mask).float()
        conditional, null = both.chunk(2)
        if not null_gradient:
            null = null.detach()
        return null + scale * (conditional - null)

    return velocity


def image_rollout(
    networks: UnifiedNetworks,
    images: torch.Tensor,
    group: int,
    generator: torch.Generator,
    sampling: SDESampling,
    flow_shift: float,
    greedy_captions: bool = True,
) -> Rollout:
    """Stage 2: one caption per image (frozen captioner), G SDE samples of it by the generator, scored."""
    captioner = networks.captioner
    features = captioner.image_features(images)
    captions = captioner.sample(features, generator, greedy=greedy_captions)
    texts = [text for text in captioner.decode(captions) for _ in range(group)]
    guided = sampling.guidance_scale != 1.0
    cond, mask = condition(networks, texts, guided)
    noise = render_noise(networks, len(texts), sampling.size, generator)
    times = sde_times(sampling.steps, flow_shift)
    velocity = velocity_of(networks.generator, cond, mask, sampling.guidance_scale)
    with torch.no_grad():
        trajectory = sample_sde(velocity, noise.to(images.device), times, sampling.noise_level, generator)
        rendered = networks.latents.decode(trajectory.samples, (sampling.size, sampling.size)).float().clamp(0, 1)
    total, parts = reward(networks.similarity, images.repeat_interleave(group, dim=0), rendered, None, RewardTerms())
    return Rollout(images, features, captions, texts, rendered, total, parts, trajectory, (cond, mask))
