"""Text-to-image and editing with a trained UniLIP generator (UniLIP Sec. 3.3; REFERENCE section 3).

    pipe = UniLIPPipeline.from_pretrained("runs/<name>/generate/stage3/generator")
    images = pipe(["a red motorcycle in a garage"])                                  # (1, 3, 448, 448) in [0, 1]
    edited = pipe(["make it black and white"], source_images=photo)                  # photo (1, 3, H, W) in [0, 1]

Sampling: classifier-free guidance against the null prompt (4.5), DPM-Solver++ for flows (20 steps)
or flow-matching Euler; the DiT's 16 x 16 latent for 448 px is decoded at 512 px and resized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from unilip.models.generator import DiTPreset, UniLIPGenerator
from unilip.models.latents import DCAELatents, UniLIPLatents, build_dcae, latent_grid
from unilip.models.mllm import DualConditioner, MLLMPreset, build_language_model, load_text_tokenizer
from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer

log = logging.getLogger(__name__)

SCHEDULERS = ("dpm", "euler")
TEXT_TOKENIZER_DIR = "text_tokenizer"


def make_scheduler(name: str, flow_shift: float = 3.0):
    """A fresh diffusers scheduler for a rectified-flow model predicting n - x0 (timesteps = 1000 t)."""
    if name == "dpm":  # DPM-Solver++ (2nd order) on flow sigmas, SANA's sampler
        return DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, solver_order=2
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    raise ValueError(f"scheduler={name!r} is not known; use one of {SCHEDULERS}")


class UniLIPPipeline:
    """Prompts (+ source images) -> images, from a generator, its frozen conditioner and its latent space.

    Args:
        generator: queries, connector and DiT.
        conditioner: the frozen LLM + UniLIP encoder the generator was trained with.
        latents: the space the DiT generates in (`UniLIPLatents`; `DCAELatents` after stage 1).
        scheduler: "dpm" (DPM-Solver++ for flows) or "euler".
        flow_shift: timestep shift of the sampling schedule (`from_pretrained`: the one recorded at training).
    """

    def __init__(
        self,
        generator: UniLIPGenerator,
        conditioner: DualConditioner,
        latents: nn.Module,
        scheduler: str = "dpm",
        flow_shift: float = 3.0,
    ):
        make_scheduler(scheduler)  # fail now on a bad name
        self.generator, self.conditioner, self.latents = generator, conditioner, latents
        self.scheduler, self.flow_shift = scheduler, flow_shift

    @property
    def device(self) -> torch.device:
        return self.generator.queries.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> UniLIPPipeline:
        for module in (self.generator, self.conditioner, self.latents):
            module.to(device=device, dtype=dtype)
        return self

    def guided_velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """v_null + scale (v_cond - v_null). `condition`, `mask`: the B conditional rows, then the B null rows."""
        doubled = torch.cat([latents, latents])
        velocity = self.generator(doubled, timestep.expand(doubled.shape[0]), condition, mask).float()
        conditional, null = velocity.chunk(2)
        return null + scale * (conditional - null)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        source_images: torch.Tensor | None = None,
        has_source: torch.Tensor | None = None,
        *,
        guidance_scale: float = 4.5,
        num_inference_steps: int = 20,
        seed: int = 0,
        size: int | tuple[int, int] = 448,
        scheduler: str | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> (B, 3, size, size) images in [0, 1] (`size` (height, width): (B, 3, height, width)).

        Text-to-image without `source_images`; editing with them ((B, 3, H, W) in [0, 1], the prompts
        are instructions). `has_source` (B,) bool mixes both in one batch (rows without a source are
        text-to-image). The same seed gives the same images. `noise` ((B, C, h, w), h = ceil(height / 28),
        w = ceil(width / 28)) replaces the starting noise drawn from `seed`, e.g. to fix one seed per prompt
        across batches.
        """
        count = len(prompts)
        if has_source is None:
            has_source = torch.full((count,), source_images is not None)
        has_source = has_source.cpu().bool()
        features = None
        if has_source.any():
            if source_images is None:
                raise ValueError("has_source marks edit rows but no source_images were given")
            features = self.conditioner.image_features(
                source_images[has_source.to(source_images.device)].to(self.device)
            )
            features = torch.cat([features, features])
        both = torch.cat([has_source, has_source])
        null = torch.cat([torch.zeros(count, dtype=torch.bool), torch.ones(count, dtype=torch.bool)])
        batch = self.conditioner.prepare(prompts * 2, both, null, self.generator.config.num_queries).to(self.device)
        condition = self.generator.condition(self.conditioner, batch, features)

        height, width = (size, size) if isinstance(size, int) else size
        shape = (count, self.latents.channels, latent_grid(height), latent_grid(width))
        if noise is None:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; {size} px needs {shape}")
        latents = noise.float().to(self.device)
        sampler = make_scheduler(scheduler or self.scheduler, self.flow_shift)
        sampler.set_timesteps(num_inference_steps, device=self.device)
        for t in sampler.timesteps:
            velocity = self.guided_velocity(latents, t, condition, batch.attention_mask, guidance_scale)
            latents = sampler.step(velocity, t, latents).prev_sample
        return self.latents.decode(latents, (height, width)).float().clamp(0, 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        tokenizer: str | UniLIPTokenizer | None = None,
        mllm_weights: str | None = None,
        scheduler: str = "dpm",
        flow_shift: float | None = None,
    ) -> UniLIPPipeline:
        """Load a generator written by training (`<run>/generator`) with the MLLM and tokenizer it records.

        `tokenizer` (a run directory, saved tokenizer, checkpoint or `UniLIPTokenizer`) and `mllm_weights`
        replace the recorded sources, e.g. on a machine where they live elsewhere. `flow_shift` None: the
        shift recorded with the generator (its SANA scheduler config's).
        """
        directory = Path(directory)
        generator, meta = UniLIPGenerator.from_pretrained(directory)
        preset = MLLMPreset(**meta["mllm"])
        if mllm_weights is not None:
            preset.weights = mllm_weights
        if not isinstance(tokenizer, UniLIPTokenizer):
            from unilip.training.lineage import load_any_tokenizer

            source = tokenizer or meta["tokenizer"]["source"]
            tokenizer = load_any_tokenizer(source, TokenizerConfig(**meta["tokenizer"]["config"])).tokenizer
        text_dir = directory / TEXT_TOKENIZER_DIR
        text_tokenizer = load_text_tokenizer(str(text_dir) if text_dir.is_dir() else preset.text_tokenizer)
        conditioner = DualConditioner(
            build_language_model(preset),
            text_tokenizer,
            tokenizer.requires_grad_(False).eval(),
            image_token_id=preset.image_token_id,
            prompts=preset.prompts,
            source_size=preset.source_size,
            max_prompt_tokens=preset.max_prompt_tokens,
        )
        dit = DiTPreset(**meta["dit"])
        if meta["latents"]["kind"] == "dcae":
            latents: nn.Module = DCAELatents(build_dcae(dit))
        else:
            latents = UniLIPLatents(tokenizer, meta["latents"]["scale"])
        if flow_shift is None:
            flow_shift = meta.get("sampler", {}).get("flow_shift")
            flow_shift = float(flow_shift) if flow_shift is not None else dit.sampler_flow_shift()
        return cls(generator.eval(), conditioner, latents, scheduler, flow_shift).to(device, dtype)
