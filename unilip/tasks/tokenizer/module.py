"""`TokenizerTraining`: stage 1 and stage 2 of the UniLIP tokenizer, one LightningModule.

One optimisation step (manual optimisation, one optimizer whose parameter groups are the
generator parts and the discriminator, so one backward serves both and DDP sees one):

    x^ = tokenizer(x);  L_G = recon + perceptual [+ distill(student, teacher)] [+ GAN_G(D(x^))]
    L_D = hinge(D(x), D(x^.detach())) + LeCam                  (after the GAN start)
    backward(L_G + L_D), clip G and D separately, step, schedule, EMA

D's parameters are frozen while L_G's adversarial term runs, so L_G never trains D and L_D
never reaches the generator: the same updates as alternating G and D steps.

Frozen networks (the stage-2 teacher, LPIPS, ConvNeXt) live outside the module tree: no
optimizer, no gradient sync, not in checkpoints. They are rebuilt from their own weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from unilip.data.shards import DataError
from unilip.data.transforms import batch_to_float
from unilip.evaluation.metrics import feature_similarity, psnr, ssim
from unilip.losses import LeCamRegularizer, TokenizerLoss
from unilip.models.hub import enable_activation_checkpointing
from unilip.models.tokenizer import FrozenEncoder, UniLIPTokenizer
from unilip.tasks.tokenizer.sharding import shard_tokenizer
from unilip.tasks.tokenizer.stages import apply_stage, check_stage
from unilip.training.distributed import average_gradients, exclude_from_ddp, gathered_state_dict
from unilip.training.ema import EMA, ValidatesWithEMA
from unilip.training.flops import flop_counter
from unilip.training.frozen import FrozenNetworks, FrozenStaysInEval
from unilip.training.nonfinite import NonFiniteGuard
from unilip.training.param_groups import decay_groups
from unilip.training.rng import gather_rng_states, restore_rng_states
from unilip.training.schedules import cosine_with_warmup
from unilip.training.steps import backward_step, optimizer_step
from unilip.training.validation import EpochMeans, log_epoch_means

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TokenizerHelpers(FrozenNetworks):
    """The networks stage 1 and 2 use but do not train (see the module docstring)."""

    loss: TokenizerLoss
    teacher: FrozenEncoder | None = None


@contextmanager
def frozen_parameters(module: nn.Module):
    """Temporarily stop gradients flowing into `module`'s parameters (they still flow through it)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(module.parameters(), flags, strict=True):
            param.requires_grad_(flag)


class TokenizerTraining(FrozenStaysInEval, ValidatesWithEMA, L.LightningModule):
    """Trains a `UniLIPTokenizer` for one stage of the recipe.

    Args:
        tokenizer: the model; its `parts()` decide what each stage trains.
        stage: 1 (decoder alignment: encoder frozen) or 2 (self-distillation: all train).
        loss: the objective's terms and weights.
        optimizer: a partial optimizer (e.g. AdamW with betas and weight decay), given param groups.
        lr: LR of the bottleneck and decoder; `encoder_lr_multiplier` x lr for ViT + projector (stage 2).
        discriminator: PatchGAN, or None for no GAN (stage 1 of the recipe, whose GAN start is past its end).
        discriminator_lr: its LR (same schedule).
        teacher: frozen encoder for the distillation loss (stage 2).
        warmup_steps, max_steps, final_lr: cosine schedule with warm-up, ending at final_lr.
        grad_clip: max gradient norm, applied to the generator and the discriminator separately.
        ema_decay: decay of the weight EMA used for validation and export (None: no EMA).
        gan_start_step: optimizer step at which the adversarial terms and the discriminator start.
        max_nonfinite_streak: stop after this many consecutive steps with a non-finite loss.
        gradient_checkpointing: recompute ViT activations in backward (memory for compute).
        compile: `torch.compile` the ViT and the decoder (True: inductor; or a backend name).
        channels_last: keep the conv decoder and the discriminator in channels-last memory format
            (faster convolutions on tensor-core GPUs).
        skip_nonfinite: skip steps whose loss is not finite, counting them. With a fused AdamW
            (`optim.optimizer.fused=true`) the skip happens on the device: no host sync per step,
            but a skipped step still advances the schedule and the EMA, and a run of bad steps is
            noticed at the next logging step. Otherwise it costs one scalar host sync per step
            and a skipped step changes nothing. Off: nothing is checked.
        sample_dir: where validation reconstruction grids are written (PNG).
        metadata: facts about the run recorded with every checkpoint (e.g. where the teacher came from).
    """

    def __init__(
        self,
        tokenizer: UniLIPTokenizer,
        stage: int,
        loss: TokenizerLoss,
        optimizer: Callable[..., Optimizer],
        lr: float = 1e-4,
        encoder_lr_multiplier: float = 0.1,
        discriminator: nn.Module | None = None,
        discriminator_lr: float = 1e-4,
        teacher: FrozenEncoder | None = None,
        warmup_steps: int = 10_000,
        max_steps: int = 300_000,
        final_lr: float = 1e-5,
        grad_clip: float | None = 1.0,
        ema_decay: float | None = 0.9999,
        gan_start_step: int = 0,
        lecam_decay: float = 0.999,
        max_nonfinite_streak: int = 20,
        gradient_checkpointing: bool = False,
        compile: bool | str = False,
        channels_last: bool = False,
        skip_nonfinite: bool = True,
        sample_dir: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.stage = check_stage(stage)
        if stage == 2 and loss.distill_weight and teacher is None:
            raise ValueError("stage 2 with a distillation weight needs a teacher encoder")
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        self.lecam = LeCamRegularizer(lecam_decay) if discriminator is not None else None
        self.frozen = TokenizerHelpers(loss=loss, teacher=teacher)
        self.optimizer_factory = optimizer
        self.lr, self.encoder_lr_multiplier, self.discriminator_lr = lr, encoder_lr_multiplier, discriminator_lr
        self.warmup_steps, self.max_steps, self.final_lr = warmup_steps, max_steps, final_lr
        self.grad_clip, self.ema_decay, self.gan_start_step = grad_clip, ema_decay, gan_start_step
        self.gradient_checkpointing, self.compile_modules = gradient_checkpointing, compile
        self.channels_last, self.skip_nonfinite = channels_last, skip_nonfinite
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self.metadata = (
            OmegaConf.to_container(metadata, resolve=True) if isinstance(metadata, DictConfig) else dict(metadata or {})
        )
        self.groups = apply_stage(tokenizer, stage)
        self.ema: EMA | None = None
        self.average_discriminator_gradients = False
        self._probe_layouts = False  # DDP: match parameter strides to gradient strides in the first step
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor
        # buffers: saved with the weights, updated on the device
        self.nonfinite = NonFiniteGuard(max_nonfinite_streak)
        names = ["val/psnr", "val/ssim"] + (["val/teacher_cosine"] if teacher is not None else [])
        self.val_means = EpochMeans(names)

    @property
    def loss(self) -> TokenizerLoss:
        return self.frozen.loss

    @property
    def teacher(self) -> FrozenEncoder | None:
        return self.frozen.teacher

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.ema is not None:  # called again (e.g. by a second fit): already set up
            return
        if self.gradient_checkpointing:
            enable_activation_checkpointing(self.tokenizer.vision_tower)
        fsdp = getattr(self, "device_mesh", None) is not None  # ModelParallelStrategy: FSDP2
        if fsdp:
            shard_tokenizer(self.tokenizer, self.device_mesh)
            self.groups = {part: self.tokenizer.part_parameters(part) for part in self.groups}
        if self._trainer is not None and self.trainer.world_size > 1:
            if self.discriminator is not None:
                # D is replicated outside DDP/FSDP and averaged by hand: it has gradients only from
                # the GAN start, and DDP would otherwise search every step for unused parameters.
                self.average_discriminator_gradients = True
                if not fsdp:
                    exclude_from_ddp(self, "discriminator")
            self._probe_layouts = not fsdp
        if self.channels_last:
            self.tokenizer.decoder.to(memory_format=torch.channels_last)
            if self.discriminator is not None:
                self.discriminator.to(memory_format=torch.channels_last)
        if self.compile_modules:
            backend = "inductor" if self.compile_modules is True else self.compile_modules
            self.tokenizer.vision_tower.compile(backend=backend)
            self.tokenizer.decoder.compile(backend=backend)
        if self.ema_decay is not None:
            trainable = {n: p for n, p in self.tokenizer.named_parameters() if p.requires_grad}
            self.ema = EMA(trainable, decay=self.ema_decay)

    def configure_optimizers(self):
        groups = []
        for part, params in self.groups.items():
            lr = self.lr * (self.encoder_lr_multiplier if part == "encoder" else 1.0)
            groups += decay_groups(params, lr=lr, name=part)
        if self.discriminator is not None:
            groups += decay_groups(
                list(self.discriminator.parameters()), lr=self.discriminator_lr, name="discriminator"
            )
        optimizer = self.optimizer_factory(groups)
        scheduler = cosine_with_warmup(optimizer, self.warmup_steps, self.max_steps, self.final_lr / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}  # stepped by hand after each optimizer step

    def on_fit_start(self) -> None:
        self.frozen.to(self.device)

    def on_validation_start(self) -> None:
        self.frozen.to(self.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the loaders deliver uint8 images; they become floats here, on the device
        return batch_to_float(batch) if isinstance(batch, dict) else batch

    # ------------------------------------------------------------------ training
    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.gan_start_step

    def _losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple | None]:
        """Weighted generator and discriminator terms, and D's logits (for the LeCam EMAs, updated after the step)."""
        out = self.tokenizer.reconstruct(images)
        generator = self.loss.reconstruction(images, out.images)
        if self.teacher is not None and self.loss.distill_weight:
            generator |= self.loss.distillation(out.features, self.teacher.features(images))
        discriminator: dict[str, torch.Tensor] = {}
        logits = None
        if self._gan_active():
            with frozen_parameters(self.discriminator):
                generator |= self.loss.generator_adversarial(self.discriminator(out.images))
            logits_real = self.discriminator(images)
            logits_fake = self.discriminator(out.images.detach())
            discriminator = self.loss.discriminator(logits_real, logits_fake, self.lecam(logits_real, logits_fake))
            logits = (logits_real.detach(), logits_fake.detach())
        return generator, discriminator, logits

    def _clip(self, params: list[nn.Parameter]) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.flops_per_batch is None:
            self.flops_per_batch = self._count_flops(batch["image"])
        self._training_step(batch)

    def _count_flops(self, images: torch.Tensor) -> int:
        """Model FLOPs of one step on this rank: the forward and backward as the step runs them (frozen
        networks' forwards, gradients into trainable weights and through frozen networks to their
        inputs), counted with `unilip.training.flops.flop_counter` on a dry run whose gradients are discarded.

        Counting the real step instead would run it under a dispatch mode, which may pick other
        kernels: the first step after a resume would then differ from the uninterrupted run.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        with flop_counter() as counter:
            generator, discriminator, _ = self._losses(images)
            total = sum(generator.values()) + sum(discriminator.values(), torch.zeros((), device=images.device))
            torch.autograd.grad(total, params, allow_unused=True)
        return counter.get_total_flops()

    def _training_step(self, batch: dict[str, Any]) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        images = batch["image"]
        generator, discriminator, logits = self._losses(images)
        total = sum(generator.values()) + sum(discriminator.values(), torch.zeros((), device=images.device))
        optimizer.zero_grad(set_to_none=True)
        backward_step(self, total)
        norms = {"grad_norm/generator": self._clip([p for ps in self.groups.values() for p in ps])}
        if discriminator and self.average_discriminator_gradients:
            average_gradients(self.discriminator)
        if discriminator:
            norms["grad_norm/discriminator"] = self._clip(list(self.discriminator.parameters()))

        # A finite loss can still have non-finite gradients: the norms (inf or NaN if any gradient
        # is) are checked with the loss, on every rank together.
        def update_lecam(bad: torch.Tensor | None) -> None:  # a skipped step's logits stay out of the averages
            if logits is not None:
                self.lecam.update(*logits, keep=None if bad is None else 1.0 - bad)

        if not optimizer_step(self, optimizer, scheduler, [total, *norms.values()], update_lecam):
            return
        logged = {f"loss/{name}": value.detach() for name, value in (generator | discriminator).items()}
        logged["loss/total"] = total.detach()
        self.log_dict(logged | norms, on_step=True, prog_bar=False)
        self.log("loss", total.detach(), prog_bar=True, logger=False)
        for group in optimizer.param_groups:
            if group["params"] and group["weight_decay"] != 0.0:
                self.log(f"lr/{group['name']}", group["lr"], on_step=True)
        self.log("nonfinite_steps", self.nonfinite.total, on_step=True)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.val_means.reset()
        super().on_validation_epoch_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        out = self.tokenizer.reconstruct(images)  # on padding batches too: FSDP's forward is collective
        if batch.get("padding"):
            return
        recon = out.images.float().clamp(0, 1)
        # eval.py's definitions: per-image PSNR and SSIM (valid region), averaged over images
        self.val_means.add("val/psnr", psnr(images, recon))
        self.val_means.add("val/ssim", ssim(images, recon))
        if self.teacher is not None:
            cosine, _ = feature_similarity(out.features, self.teacher.features(images))
            self.val_means.add("val/teacher_cosine", cosine)
        if batch_idx == 0:
            self._save_grid(images, recon)

    def on_validation_epoch_end(self) -> None:
        # every rank reduces, including ranks that got no validation image (see EpochMeans)
        means = self.val_means.compute(self.device)
        if not means:  # the same on every rank: all raise together
            raise DataError("validation: no rank could read a single sample; check data.val_urls (see the warnings)")
        log_epoch_means(self, means)
        super().on_validation_epoch_end()

    def _save_grid(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        if self.global_rank != 0:
            return
        from torchvision.utils import make_grid, save_image

        count = min(8, images.shape[0])
        grid = make_grid(torch.cat([images[:count], recon[:count]]).float().cpu(), nrow=count)
        if self.sample_dir is not None:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
            save_image(grid, self.sample_dir / f"reconstruction_step{self.global_step:07d}.png")
        logger = self.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image("val/reconstruction", [grid], step=self.global_step, caption=["top: input, bottom: EMA"])

    # ------------------------------------------------------------------ results and checkpoints
    def save_result(self, run_dir: Path) -> None:
        """Write the EMA tokenizer to `run_dir/tokenizer` (`save_pretrained`, with its lineage).

        Every rank must call this (FSDP shards are gathered); rank 0 writes.
        """
        with self.ema_weights():
            state = gathered_state_dict(self.tokenizer)
        if self.global_rank != 0:
            return
        with torch.device("meta"):
            model = UniLIPTokenizer(self.tokenizer.config)
        model.load_state_dict(state, strict=True, assign=True)
        model.save_pretrained(Path(run_dir) / "tokenizer", training=self.metadata.get("lineage"))
        log.info("saved the EMA tokenizer to %s", Path(run_dir) / "tokenizer")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["unilip"] = {
            "task": "tokenizer",
            "stage": self.stage,
            "tokenizer_config": self.tokenizer.config.to_dict(),
            "rng": gather_rng_states(),
            **self.metadata,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("unilip", {})
        if state.get("stage", self.stage) != self.stage:
            raise ValueError(f"checkpoint is from stage {state['stage']}, this run is stage {self.stage}")
        restore_rng_states(state.get("rng"), self.global_rank)
