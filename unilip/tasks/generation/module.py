"""`GenerationTraining`: the three UniLIP generation stages as one LightningModule (REFERENCE section 3).

One step (manual optimisation, one optimizer):

    x0   = latents.encode(target) (x scale)          UniLIP latents, or DC-AE latents in stage 1 (or read from a cache)
    cond = connector(LLM(prompt, source features, queries))      prompts dropped to the null form at `cfg_dropout`
    t ~ logit-normal(0, 1);  x_t = (1 - t) x0 + t n;  loss = MSE(DiT(x_t, 1000 t, cond), n - x0)

Stage 1 trains queries, connector and projection with the DiT frozen; stages 2 and 3 also train the DiT.
The LLM and the tokenizer are frozen in every stage and live outside the module tree (not in the
optimizer, DDP/FSDP or checkpoints); they are rebuilt from their own weights.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from unilip.data.shards import DataError
from unilip.data.transforms import batch_to_float
from unilip.models.generator import UniLIPGenerator, from_state
from unilip.models.mllm import DualConditioner
from unilip.pipelines.generation import TEXT_TOKENIZER_DIR, UniLIPPipeline
from unilip.training.distributed import gathered_state_dict
from unilip.training.ema import EMA, ValidatesWithEMA
from unilip.training.flops import flop_counter
from unilip.training.frozen import FrozenNetworks, FrozenStaysInEval
from unilip.training.nonfinite import NonFiniteGuard
from unilip.training.param_groups import decay_groups
from unilip.training.rng import gather_rng_states, restore_rng_states
from unilip.training.schedules import cosine_with_warmup
from unilip.training.sharding import shard_generator
from unilip.training.steps import backward_step, optimizer_step
from unilip.training.validation import EpochMeans, log_epoch_means

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GenerationHelpers(FrozenNetworks):
    """The frozen networks of every generation stage (see the module docstring)."""

    conditioner: DualConditioner
    latents: nn.Module | None


class GenerationTraining(FrozenStaysInEval, ValidatesWithEMA, L.LightningModule):
    """Trains a `UniLIPGenerator` against a frozen `DualConditioner` for one stage of the recipe.

    Args:
        generator: queries, connector, projection and DiT (the trained parameters).
        conditioner: frozen LLM + UniLIP encoder (the dual condition).
        latents: frozen latent space of the targets (`UniLIPLatents`, or `DCAELatents` in stage 1); None when
            every training target is cached (`unilip.data.latent_cache`) and the run does not validate.
        stage: 1, 2 or 3 (recorded in checkpoints; a checkpoint of another stage is refused on resume).
        optimizer: a partial optimizer, given parameter groups.
        lr, final_lr, warmup_ratio, max_steps: cosine schedule to final_lr after warmup_ratio x max_steps.
        weight_decay: on matrices and the queries (norms and biases exempt); 0 in the reference.
        train_dit: False freezes the DiT (stage 1: only the connector learns the DiT's condition space).
        cfg_dropout: probability of replacing a prompt by the null form (classifier-free guidance).
        logit_mean, logit_std: the logit-normal timestep density (0, 1 in the recipe).
        grad_clip: max gradient norm. ema_decay: weight EMA for validation and the result (None: none).
        gradient_checkpointing: recompute LLM, connector and DiT activations in backward.
        frozen_dtype: dtype of the frozen LLM and tokenizer ("bfloat16" halves their memory).
        val_timesteps: fixed t of the validation flow loss (with fixed noise: comparable across steps).
        sample_prompts: fixed text-to-image prompts sampled at every validation, next to the first
            `num_samples` rows of the first validation batch (with their sources for edits).
        sample_size, sample_steps, guidance_scale, sample_scheduler, flow_shift: how they are sampled.
        sample_dir: where the sample grids are written (PNG and the prompts beside it).
        max_nonfinite_streak: stop after this many consecutive non-finite losses (each step is skipped).
        skip_nonfinite: skip steps whose loss is not finite, counting them: on the device with a fused
            AdamW (`optim.optimizer.fused=true`, no host sync per step), else with one scalar sync per
            step (see `NonFiniteGuard`). Off: nothing is checked.
        seed: seeds the module's own generator of noise, timesteps and prompt dropout (offset by rank);
            its state is checkpointed, so a resumed run draws exactly what an uninterrupted one would.
        metadata: what the run was made from (MLLM, DiT, tokenizer, latents), saved with the result.
    """

    def __init__(
        self,
        generator: UniLIPGenerator,
        conditioner: DualConditioner,
        latents: nn.Module | None,
        stage: int,
        optimizer: Callable[..., Optimizer],
        lr: float = 1e-4,
        final_lr: float = 1e-5,
        warmup_ratio: float = 0.003,
        weight_decay: float = 0.0,
        max_steps: int = 100_000,
        train_dit: bool = True,
        cfg_dropout: float = 0.1,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        grad_clip: float | None = 1.0,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        frozen_dtype: str | None = None,
        val_timesteps: Sequence[float] = (0.25, 0.5, 0.75),
        sample_prompts: Sequence[str] = (),
        num_samples: int = 4,
        sample_size: int = 448,
        sample_steps: int = 20,
        guidance_scale: float = 4.5,
        sample_scheduler: str = "dpm",
        flow_shift: float = 3.0,
        sample_dir: str | None = None,
        max_nonfinite_streak: int = 20,
        skip_nonfinite: bool = True,
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.stage = stage
        self.generator = generator
        self.frozen = GenerationHelpers(conditioner=conditioner, latents=latents)
        self.optimizer_factory = optimizer
        self.lr, self.final_lr, self.warmup_ratio, self.max_steps = lr, final_lr, warmup_ratio, max_steps
        self.weight_decay = weight_decay
        self.train_dit, self.cfg_dropout = train_dit, cfg_dropout
        self.logit_mean, self.logit_std, self.grad_clip, self.ema_decay = logit_mean, logit_std, grad_clip, ema_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_dtype = getattr(torch, frozen_dtype) if frozen_dtype else None
        self.val_timesteps, self.sample_prompts = tuple(val_timesteps), list(sample_prompts)
        self.num_samples, self.sample_size, self.sample_steps = num_samples, sample_size, sample_steps
        self.guidance_scale, self.sample_scheduler, self.flow_shift = guidance_scale, sample_scheduler, flow_shift
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self.skip_nonfinite = skip_nonfinite
        self.seed, self.rng = seed, torch.Generator()
        self.metadata = (
            OmegaConf.to_container(metadata, resolve=True) if isinstance(metadata, DictConfig) else dict(metadata or {})
        )
        # Set once, before any wrapping: FSDP2 does not follow later requires_grad switches.
        for part, params in generator.parts().items():
            for param in params:
                param.requires_grad_(part != "dit" or train_dit)
        self.ema: EMA | None = None
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor
        self.nonfinite = NonFiniteGuard(max_nonfinite_streak)
        self.val_means = EpochMeans(["val/flow_loss"])
        self._grid_rows: dict[str, Any] | None = None
        self._probe_layouts = False  # DDP: match parameter strides to gradient strides in the first step

    @property
    def conditioner(self) -> DualConditioner:
        return self.frozen.conditioner

    @property
    def latents(self) -> nn.Module | None:
        return self.frozen.latents

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.ema is not None:
            return
        if self.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            self.conditioner.enable_gradient_checkpointing()
        fsdp = getattr(self, "device_mesh", None) is not None  # ModelParallelStrategy: FSDP2
        if fsdp:
            shard_generator(self.generator, self.device_mesh)
        self._probe_layouts = self._trainer is not None and self.trainer.world_size > 1 and not fsdp
        if self.ema_decay is not None:
            trainable = {n: p for n, p in self.generator.named_parameters() if p.requires_grad}
            self.ema = EMA(trainable, decay=self.ema_decay)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        parts = self.generator.parts()
        return {part: params for part, params in parts.items() if part != "dit" or self.train_dit}

    def configure_optimizers(self):
        groups = [
            g
            for part, ps in self.trainable_parameters().items()
            for g in decay_groups(ps, lr=self.lr, weight_decay=self.weight_decay, name=part)
        ]
        optimizer = self.optimizer_factory(groups)
        warmup = math.ceil(self.warmup_ratio * self.max_steps)
        scheduler = cosine_with_warmup(optimizer, warmup, self.max_steps, self.final_lr / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}  # stepped by hand after each optimizer step

    def setup(self, stage: str) -> None:
        # before a checkpoint is restored (which then replaces the state): fresh runs start here
        self.rng.manual_seed(self.seed + 1_000_003 * self.global_rank)

    def _place_frozen(self) -> None:
        self.frozen.to(self.device, self.frozen_dtype)

    def on_fit_start(self) -> None:
        self._place_frozen()

    def on_validation_start(self) -> None:
        self._place_frozen()

    # ------------------------------------------------------------------ the objective
    def inputs(self, batch: dict[str, Any], drop: bool):
        """Batch -> (x0 (B, 32, h, w) scaled latents, `PromptBatch`, source features (E, N, D) or None).

        A batch of cached targets (`latent`, `source_features`: `unilip.data.latent_cache`) holds x0 and the
        edits' features already; otherwise the frozen encoders compute them from the images.
        """
        cached = "latent" in batch
        count = len(batch["caption"])
        has_source = batch.get("has_source", torch.zeros(count, dtype=torch.bool)).bool()  # on the host
        null = (
            torch.rand(count, generator=self.rng) < self.cfg_dropout if drop else torch.zeros(count, dtype=torch.bool)
        )
        prompt = self.conditioner.prepare(list(batch["caption"]), has_source, null, self.generator.config.num_queries)
        features = None
        edits = has_source.nonzero().squeeze(1)  # host indices: no device->host sync
        if len(edits) and cached:
            features = batch["source_features"]
        elif len(edits):
            sources = batch["source_image"]
            features = self.conditioner.image_features(sources.index_select(0, edits.to(sources.device)))
        x0 = batch["latent"] if cached else self.latents.encode(batch["image"])
        return x0.float(), prompt.to(self.device), features

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Prompts are tokenised on the host: the edit flags stay there, so no step reads them back.
        if not isinstance(batch, dict) or "has_source" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        rest = {key: value for key, value in batch.items() if key != "has_source"}
        return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "has_source": batch["has_source"]}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the loaders deliver uint8 images; they become floats here, on the device
        return batch_to_float(batch) if isinstance(batch, dict) else batch

    def flow_loss(self, x0: torch.Tensor, prompt, features, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Rectified flow at times t (B,) in (0, 1): MSE(v(x_t, t), n - x0) with x_t = (1 - t) x0 + t n."""
        condition = self.generator.condition(self.conditioner, prompt, features)
        s = t.view(-1, 1, 1, 1).to(x0)
        noisy = (1 - s) * x0 + s * noise
        velocity = self.generator(noisy, t.to(x0) * 1000, condition, prompt.attention_mask)
        return F.mse_loss(velocity.float(), (noise - x0).float())

    def sample_timesteps(self, count: int) -> torch.Tensor:
        """(count,) training times in (0, 1): logit-normal (sigmoid of N(logit_mean, logit_std^2)), the recipe's
        density (SD3's), drawn from the module's own generator."""
        return compute_density_for_timestep_sampling(
            "logit_normal", count, logit_mean=self.logit_mean, logit_std=self.logit_std, generator=self.rng
        )

    @torch.no_grad()
    def fixed_timestep_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The flow loss averaged over `val_timesteps`, with each sample's noise seeded by its key: comparable
        across steps, and the same whichever rank or batch the sample falls in."""
        x0, prompt, features = self.inputs(batch, drop=False)
        noise = torch.stack(
            [
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
                for key in batch["key"]
            ]
        ).to(x0)
        losses = [
            self.flow_loss(x0, prompt, features, torch.full((x0.shape[0],), t, device=self.device), noise)
            for t in self.val_timesteps
        ]
        return torch.stack(losses).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.flops_per_batch is None:
            # Model FLOPs of one step (this rank's batch), counted once; Lightning's ThroughputMonitor
            # turns it into FLOP/s and MFU.
            with flop_counter() as counter:
                self._training_step(batch)
            self.flops_per_batch = counter.get_total_flops()
        else:
            self._training_step(batch)

    def _training_step(self, batch: dict[str, Any]) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        x0, prompt, features = self.inputs(batch, drop=True)
        t = self.sample_timesteps(x0.shape[0]).to(self.device)
        noise = torch.randn(x0.shape, generator=self.rng).to(x0)
        loss = self.flow_loss(x0, prompt, features, t, noise)
        optimizer.zero_grad(set_to_none=True)
        backward_step(self, loss)
        params = [p for ps in self.trainable_parameters().values() for p in ps if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip is not None else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # a finite loss can have non-finite gradients: the norm is checked with it
        if not optimizer_step(self, optimizer, scheduler, [loss, norm]):
            return
        self.log_dict(
            {"loss/flow": loss.detach(), "grad_norm": norm, "lr": optimizer.param_groups[0]["lr"]}, on_step=True
        )
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        self.log("nonfinite_steps", self.nonfinite.total, on_step=True)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.val_means.reset()
        self._grid_rows = None
        super().on_validation_epoch_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.fixed_timestep_loss(batch)  # on padding batches too: FSDP's forward is collective
        if batch.get("padding"):
            return
        self.val_means.add("val/flow_loss", loss.expand(len(batch["key"])))
        if batch_idx == 0:
            self._grid_rows = self._sample_rows(batch)

    def on_validation_epoch_end(self) -> None:
        # every rank reduces, including ranks that got no validation sample (see EpochMeans)
        means = self.val_means.compute(self.device)
        if not means:  # the same on every rank: all raise together
            raise DataError("validation: no rank could read a single sample; check data.val_urls (see the warnings)")
        log_epoch_means(self, means)
        rows, self._grid_rows = self._grid_rows, None
        if getattr(self, "device_mesh", None) is not None:
            # FSDP: sampling runs collective forward passes, so every rank samples rank 0's rows
            shared = [rows]
            torch.distributed.broadcast_object_list(shared, src=0)
            self._sample_grid(shared[0])
        elif self.global_rank == 0:
            self._sample_grid(rows)
        super().on_validation_epoch_end()

    def pipeline(self) -> UniLIPPipeline:
        """A sampling pipeline over this module's (current) weights."""
        return UniLIPPipeline(self.generator, self.conditioner, self.latents, self.sample_scheduler, self.flow_shift)

    def _sample_rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The first `num_samples` rows of a validation batch, at the sample size, on the host."""
        count, size = min(self.num_samples, batch["image"].shape[0]), self.sample_size

        def resized(images: torch.Tensor) -> torch.Tensor:
            return F.interpolate(images[:count].float(), size=(size, size), mode="bilinear", antialias=True).cpu()

        targets = resized(batch["image"])
        has_source = batch.get("has_source", torch.zeros(count, dtype=torch.bool))[:count].cpu().bool()
        sources = resized(batch["source_image"]) if "source_image" in batch else torch.full_like(targets, 0.5)
        sources = torch.where(has_source.view(-1, 1, 1, 1), sources, 0.5)
        return {"caption": list(batch["caption"][:count]), "target": targets, "source": sources, "edit": has_source}

    @torch.no_grad()
    def _sample_grid(self, rows: dict[str, Any] | None) -> None:
        """Sample the fixed prompts and `rows` (a validation batch's first rows; None: none), and write the grid
        (rows of the grid: source, sample, target) on rank 0."""
        size, fixed = self.sample_size, len(self.sample_prompts)
        blank = torch.full((fixed, 3, size, size), 0.5)
        no_edit = torch.zeros(fixed, dtype=torch.bool)
        if rows is None:
            rows = {"caption": [], "target": blank[:0], "source": blank[:0], "edit": no_edit[:0]}
        prompts = self.sample_prompts + rows["caption"]
        if not prompts:
            return
        sources = torch.cat([blank, rows["source"]]).to(self.device)
        mask = torch.cat([no_edit, rows["edit"]]).to(self.device)
        samples = self.pipeline()(
            prompts, sources, mask, guidance_scale=self.guidance_scale, num_inference_steps=self.sample_steps, size=size
        )
        if self.global_rank != 0:
            return
        from torchvision.utils import make_grid, save_image

        targets = torch.cat([blank, rows["target"]])
        grid = make_grid(torch.cat([sources.cpu(), samples.float().cpu(), targets]), nrow=len(prompts))
        caption = "rows: source (edits), sample, target; prompts: " + " | ".join(prompts)
        if self.sample_dir is not None:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
            stem = self.sample_dir / f"generation_step{self.global_step:07d}"
            save_image(grid, stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
        if self.logger is not None and hasattr(self.logger, "log_image"):
            self.logger.log_image("val/samples", [grid], step=self.global_step, caption=[caption])

    # ------------------------------------------------------------------ results and checkpoints
    def save_result(self, run_dir: Path) -> None:
        """Write the (EMA) generator to `run_dir/generator` with its text tokenizer and lineage. Call on every rank."""
        with self.ema_weights():
            state = gathered_state_dict(self.generator)
        if self.global_rank != 0:
            return
        model = from_state(self.generator.config.to_dict(), state, "the trained generator")
        out = Path(run_dir) / "generator"
        model.save_pretrained(out, meta={"stage": self.stage, **self.metadata})
        self.conditioner.text_tokenizer.save_pretrained(str(out / TEXT_TOKENIZER_DIR))
        log.info("saved the generator to %s", out)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["unilip"] = {
            "task": "generate",
            "stage": self.stage,
            "generator_config": self.generator.config.to_dict(),
            # counted once per run: counting runs a step under FlopCounterMode, whose kernels round
            # differently, so a resumed run must not count (and change) its first step again
            "flops_per_batch": self.flops_per_batch,
            "rng": gather_rng_states({"generation": self.rng.get_state()}),
            **self.metadata,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("unilip", {})
        if state.get("task", "generate") != "generate" or state.get("stage", self.stage) != self.stage:
            raise ValueError(
                f"checkpoint is {state.get('task')} stage {state.get('stage')}, this run generate {self.stage}"
            )
        self.flops_per_batch = state.get("flops_per_batch")
        rng = restore_rng_states(state.get("rng"), self.global_rank)
        if "generation" in rng:
            self.rng.set_state(rng["generation"])
