"""`UnifiedTraining`: UAE's Unified-GRPO as one LightningModule, its two steps as stages (UniLIP's encoder is the
understanding half, its generator the generation half; reconstruction similarity is the objective).

    stage 1, generation for understanding: captioner (InternVL LLM, LoRA) trained, generator frozen
        G captions per image -> rendered by the generator -> reward = similarity(image, rendering) (+ terms)
    stage 2, understanding for generation: DiT (LoRA or full) trained, captioner frozen
        one caption per image -> G SDE samples of it -> reward = similarity(image, sample)

Both: group-relative advantages, clipped ratio, KL to the reference policy (the adapters switched off, or a
frozen copy of a fully trained DiT), `updates_per_rollout` optimizer steps per rollout (GRPO's mu). The loop
alternates by chaining runs: stage 2 reads the captioner of stage 1, a next stage 1 the generator of stage 2.

The networks live outside the module tree (`UnifiedNetworks`, rebuilt from their sources); the parameters
the stage trains are registered in it (`self.trained`: the same Parameter objects), so only they are
optimised, synchronised under DDP and checkpointed, and the base weights are never written. Under FSDP2
(`trainer=fsdp`) the network a stage trains is sharded over the ranks first and its sharded parameters are
registered instead (`sharding.py`).
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer

from unilip.data.shards import DataError
from unilip.data.transforms import to_float
from unilip.logs import is_logging_step
from unilip.models.captioner import save_captioner
from unilip.models.generator import dit_velocity, from_state
from unilip.models.lora import LoRASpec, adapters_disabled, add_lora, load_adapters, merged_state_dict
from unilip.pipelines.generation import TEXT_TOKENIZER_DIR
from unilip.tasks.unified.grpo import FLOW_KL, GRPOLoss, flow_step_loss, group_advantages, grpo_loss, token_kl
from unilip.tasks.unified.rollouts import (
    Rendering,
    RewardTerms,
    Rollout,
    SDESampling,
    TrainedParameters,
    UnifiedNetworks,
    caption_rollout,
    image_rollout,
    render,
    render_noise,
    reward,
    velocity_of,
)
from unilip.tasks.unified.sharding import agreed_rows, check_all_sharded, shard_unified
from unilip.training.distributed import gathered, gathered_state_dict
from unilip.training.ema import EMA, ValidatesWithEMA
from unilip.training.frozen import FrozenStaysInEval
from unilip.training.nonfinite import NonFiniteGuard
from unilip.training.rng import gather_rng_states, restore_rng_states
from unilip.training.schedules import cosine_with_warmup
from unilip.training.validation import EpochMeans, log_epoch_means

log = logging.getLogger(__name__)

STAGES = {1: "captioner", 2: "generator"}


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1], whether the loader gives float [0, 1] or uint8 [0, 255]: uint8 through the
    conversion every module shares (`to_float`: v / 255 with the same bits on every device, where a GPU's own
    division differs in the last bit at about half of the levels)."""
    return to_float(images).float()


class UnifiedTraining(FrozenStaysInEval, ValidatesWithEMA, L.LightningModule):
    """One step of the unified loop (see the module docstring).

    Args:
        networks: captioner, generator, its conditioner and latents, the similarity encoders.
        trained: the parameters this stage trains, by name (`add_lora`'s adapters, or the DiT's parameters).
        stage: 1 (train the captioner) or 2 (train the generator's DiT).
        optimizer: a partial optimizer, given parameter groups.
        lr, final_lr, warmup_steps, max_steps, weight_decay: AdamW on the trained parameters, cosine schedule.
        group_size: G, outputs per input whose rewards are compared.
        clip_range, kl_weight: GRPO's eps_clip and beta.
        flow_kl: stage 2's KL per SDE step, `flow_grpo` (Flow-GRPO's, beta carries over) or `step` (the exact
            KL of the two steps, 1 / dt times larger); see `grpo.flow_kl`.
        null_branch_gradient: stage 2's policy gradient flows through the null prompt's prediction of the guided
            velocity too (False: detached, as in Flow-GRPO).
        updates_per_rollout: optimizer steps on each rollout (mu; 1: on-policy, the ratio is 1).
        terms: the length and format terms of stage 1's reward.
        rendering: the frozen generator's sampler (stage 1's rollouts, validation).
        sampling: the SDE sampler of stage 2's rollouts.
        greedy_captions: stage 2 renders the captioner's greedy captions (False: sampled).
        rollout_chunk: rows rendered / decoded at once (None: the whole rollout).
        grad_clip, ema_decay, max_nonfinite_streak, skip_nonfinite: as in the other tasks.
        captioner_lora: the spec of the captioner's adapters (trained in stage 1, frozen in stage 2; saved with
            the captioner).
        dit_lora: the spec of the DiT's adapters (stage 2 with `dit_training.mode=lora`; merged into the saved DiT).
        gradient_checkpointing: recompute the captioner's LLM / the DiT's activations in backward.
        sample_dir: where validation grids go. seed: the module's generator (checkpointed, offset by rank).
        metadata: where the networks came from, saved with the result.
    """

    def __init__(
        self,
        networks: UnifiedNetworks,
        trained: dict[str, nn.Parameter],
        stage: int,
        optimizer: Callable[..., Optimizer],
        lr: float = 1e-5,
        final_lr: float = 1e-6,
        warmup_steps: int = 0,
        max_steps: int = 1000,
        weight_decay: float = 0.0,
        group_size: int = 8,
        clip_range: float = 0.2,
        kl_weight: float = 0.04,
        flow_kl: str = "flow_grpo",
        null_branch_gradient: bool = False,
        updates_per_rollout: int = 1,
        terms: RewardTerms | dict | None = None,
        rendering: Rendering | dict | None = None,
        sampling: SDESampling | dict | None = None,
        greedy_captions: bool = True,
        rollout_chunk: int | None = None,
        grad_clip: float | None = 1.0,
        ema_decay: float | None = None,
        max_nonfinite_streak: int = 20,
        skip_nonfinite: bool = True,
        captioner_lora: LoRASpec | None = None,
        dit_lora: LoRASpec | None = None,
        gradient_checkpointing: bool = False,
        sample_dir: str | None = None,
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage={stage}: use 1 (train the captioner) or 2 (train the generator)")
        if group_size < 2 or updates_per_rollout < 1:
            raise ValueError(f"group_size={group_size} (>= 2) and updates_per_rollout={updates_per_rollout} (>= 1)")
        self.automatic_optimization = False
        self.networks = networks
        self.trained = TrainedParameters(trained)
        self.stage, self.optimizer_factory = stage, optimizer
        self.lr, self.final_lr, self.warmup_steps, self.max_steps = lr, final_lr, warmup_steps, max_steps
        self.weight_decay = weight_decay
        if flow_kl not in FLOW_KL:
            raise ValueError(f"flow_kl={flow_kl!r}; use one of {FLOW_KL}")
        self.group_size, self.clip_range, self.kl_weight = group_size, clip_range, kl_weight
        self.flow_kl, self.null_branch_gradient = flow_kl, null_branch_gradient
        self.updates_per_rollout = updates_per_rollout
        self.terms = terms if isinstance(terms, RewardTerms) else RewardTerms(**(terms or {}))
        self.rendering = rendering if isinstance(rendering, Rendering) else Rendering(**(rendering or {}))
        self.sampling = sampling if isinstance(sampling, SDESampling) else SDESampling(**(sampling or {}))
        self.greedy_captions, self.rollout_chunk = greedy_captions, rollout_chunk
        self.grad_clip = grad_clip
        self.ema_decay, self.ema = ema_decay, None
        self.nonfinite = NonFiniteGuard(max_nonfinite_streak)
        self.skip_nonfinite = skip_nonfinite
        self.captioner_lora = captioner_lora  # None: the base captioner, no adapters to save
        self.dit_lora = dit_lora
        self.gradient_checkpointing = gradient_checkpointing
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self.seed = seed
        self.rng = torch.Generator()
        self.metadata = metadata or {}
        self.flops_per_batch = None  # Lightning's ThroughputMonitor: samples/s only (rollouts are not one forward)
        names = ["val/reward", "val/caption_length", *(f"val/sim/{n}" for n in networks.similarity.names)]
        self.val_means = EpochMeans(names)
        self._grid: dict[str, Any] | None = None
        self._configured = False
        self.sharded = False  # FSDP2: the trained network is sharded over the ranks (`sharding.py`)

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self._configured:
            return
        self._configured = True
        if self.gradient_checkpointing:
            if self.stage == 1:
                self.networks.captioner.enable_gradient_checkpointing()
            else:
                self.networks.generator.dit.enable_gradient_checkpointing()
        if getattr(self, "device_mesh", None) is not None:  # ModelParallelStrategy: FSDP2
            shard_unified(self.networks, self.stage, self.device_mesh)
            # sharding put new (DTensor) parameters in the networks: register those
            named = {name: self.networks.trained_parameter(name) for name in self.trained.named()}
            check_all_sharded(named)
            self.trained = TrainedParameters(named)
            self.sharded = True
        if self.ema_decay is not None and self.ema is None:
            self.ema = EMA(self.trained.named(), decay=self.ema_decay)

    def configure_optimizers(self):
        params = list(self.trained.parameters())
        matrices = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        groups = [{"params": matrices, "weight_decay": self.weight_decay, "name": "matrices"}]
        if others:
            groups.append({"params": others, "weight_decay": 0.0, "name": "norms_and_biases"})
        for group in groups:
            group["lr"] = self.lr
        optimizer = self.optimizer_factory(groups)
        scheduler = cosine_with_warmup(optimizer, self.warmup_steps, self.max_steps, self.final_lr / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        self.rng.manual_seed(self.seed + 1_000_003 * self.global_rank)  # a checkpoint's state replaces it

    def on_fit_start(self) -> None:
        self.networks.to(self.device)

    def on_validation_start(self) -> None:
        self.networks.to(self.device)

    # ------------------------------------------------------------------ the two steps
    def rollout(self, images: torch.Tensor) -> Rollout:
        if self.stage == 1:
            return caption_rollout(
                self.networks, images, self.group_size, self.rng, self.rendering, self.terms, self.rollout_chunk
            )
        flow_shift = self.networks.flow_shift
        return image_rollout(
            self.networks, images, self.group_size, self.rng, self.sampling, flow_shift, self.greedy_captions
        )

    def caption_loss(self, rollout: Rollout, advantages: torch.Tensor, cache: dict[str, torch.Tensor]) -> GRPOLoss:
        """Stage 1: GRPO over the caption tokens; KL to the captioner with its adapters off."""
        captioner, captions = self.networks.captioner, rollout.captions
        features = rollout.features.repeat_interleave(self.group_size, dim=0)
        log_probs = captioner.token_log_probs(features, captions)
        old = captions.log_probs if self.updates_per_rollout > 1 else log_probs.detach()
        kl = None
        if self.kl_weight > 0:
            if "reference" not in cache:
                with torch.no_grad(), adapters_disabled(captioner.language_model):
                    cache["reference"] = captioner.token_log_probs(features, captions)
            kl = token_kl(log_probs, cache["reference"])
        return grpo_loss(log_probs, old, advantages, captions.mask, self.clip_range, kl, self.kl_weight)

    def _reference_forward(self) -> Callable:
        generator, reference = self.networks.generator, self.networks.reference_dit
        if reference is None:

            def base(*args):
                with adapters_disabled(generator.dit):
                    return generator(*args)

            return base

        return functools.partial(dit_velocity, reference)

    def flow_losses(self, rollout: Rollout, advantages: torch.Tensor) -> GRPOLoss:
        """Stage 2: GRPO over the SDE steps, one backward per step (the gradient of the mean over steps);
        KL to the reference policy in closed form (two Gaussians of the same std, `grpo.flow_kl`)."""
        trajectory, (condition, mask) = rollout.trajectory, rollout.condition
        scale = self.sampling.guidance_scale
        velocity = velocity_of(self.networks.generator, condition, mask, scale, self.null_branch_gradient)
        reference = velocity_of(self._reference_forward(), condition, mask, scale)
        steps = trajectory.log_probs.shape[0]
        parts = []
        for k in range(steps):
            old = trajectory.log_probs[k] if self.updates_per_rollout > 1 else None
            part = flow_step_loss(velocity, reference, trajectory, k, advantages, old, self.clip_range,
                                  self.kl_weight, self.flow_kl)  # fmt: skip
            self.manual_backward(part.loss / steps)
            parts.append(part)
        mean = {f: torch.stack([getattr(p, f).detach() for p in parts]).mean() for f in GRPOLoss.__dataclass_fields__}
        return GRPOLoss(**mean)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        images = as_unit_float(batch["image"])
        rollout = self.rollout(images)
        advantages = group_advantages(rollout.rewards, self.group_size)
        cache: dict[str, torch.Tensor] = {}
        updates = self.updates_per_rollout
        if self._trainer is not None and self.trainer.max_steps > 0:  # end exactly at max_steps optimizer steps
            updates = max(1, min(updates, self.trainer.max_steps - self.global_step))
        for _ in range(updates):
            optimizer.zero_grad(set_to_none=True)
            if self.stage == 1:
                result = self.caption_loss(rollout, advantages, cache)
                self.manual_backward(result.loss)
            else:
                result = self.flow_losses(rollout, advantages)
            params = [p for p in self.trained.parameters() if p.grad is not None]
            if not params:  # e.g. the registered parameters are not the ones the networks compute with
                raise RuntimeError("no trained parameter received a gradient; the step would change nothing")
            limit = self.grad_clip if self.grad_clip is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
            bad = self.nonfinite.flag(result.loss, norm) if self.skip_nonfinite else None
            if self.nonfinite.skip_now(bad, False, self.global_step):
                continue
            optimizer.step()
            scheduler.step()
            if self.ema is not None:
                self.ema.update()
            if bad is not None:
                self.nonfinite.count(bad, self.global_step, check=False)
        if is_logging_step(self.trainer):
            self._log_step(rollout, result, norm, optimizer)

    def _log_step(self, rollout: Rollout, result: GRPOLoss, norm: torch.Tensor, optimizer) -> None:
        groups = rollout.rewards.view(-1, self.group_size)
        lengths = rollout.captions.lengths.float()
        metrics = {
            "reward/total": rollout.rewards.mean(),
            **{f"reward/{name}": value.mean() for name, value in rollout.terms.items()},
            "reward/group_std": groups.std(dim=1, correction=0).mean(),
            "caption/length": lengths.mean(),
            "caption/finished": rollout.captions.finished.float().mean(),
            "loss/grpo": result.loss.detach(),
            "loss/policy": result.policy,
            "loss/kl": result.kl,
            "grpo/clip_fraction": result.clip_fraction,
            "grpo/ratio": result.ratio,
        }
        self.log_dict({k: v.detach().float() for k, v in metrics.items()}, on_step=True, sync_dist=True)
        self.log_dict({"grad_norm": norm, "lr": optimizer.param_groups[0]["lr"]}, on_step=True)
        self.log("reward", rollout.rewards.mean(), prog_bar=True, logger=False)
        self.log("nonfinite_steps", self.nonfinite.total, on_step=True)

    # ------------------------------------------------------------------ validation: greedy captions, ODE renderings
    def on_validation_epoch_start(self) -> None:
        self.val_means.reset()
        self._grid = None
        super().on_validation_epoch_start()

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, keys: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor, dict]:
        """Greedy captions, their renderings from noise seeded by each image's key, and the rewards."""
        captioner = self.networks.captioner
        captions = captioner.sample(captioner.image_features(images), greedy=True)
        texts = captioner.decode(captions)
        size = self.rendering.size
        noise = torch.cat(
            [render_noise(self.networks, 1, size, torch.Generator().manual_seed(zlib.crc32(k.encode()))) for k in keys]
        )
        rendered = render(self.networks, texts, noise, self.rendering, self.rollout_chunk)
        total, parts = reward(self.networks.similarity, images, rendered, captions, self.terms)
        return texts, rendered, total, {**parts, "caption_length": captions.lengths.float()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, keys = as_unit_float(batch["image"]), list(batch["key"])
        count = len(images)
        if self.sharded:  # the same rows on every rank, so that chunked rendering gathers as often everywhere
            images, keys = agreed_rows(images, keys)
        texts, rendered, total, parts = self.evaluate(images, keys)
        if batch.get("padding"):
            return
        images, texts, rendered, total = images[:count], texts[:count], rendered[:count], total[:count]
        parts = {name: value[:count] for name, value in parts.items()}
        self.val_means.add("val/reward", total)
        self.val_means.add("val/caption_length", parts["caption_length"])
        for name in self.networks.similarity.names:
            self.val_means.add(f"val/sim/{name}", parts[f"sim/{name}"])
        if self._grid is None:
            self._grid = {"sources": images.cpu(), "rendered": rendered.cpu(), "captions": texts}

    def on_validation_epoch_end(self) -> None:
        means = self.val_means.compute(self.device)
        if not means:
            raise DataError("validation: no rank could read a single sample; check data.val_urls (see the warnings)")
        log_epoch_means(self, means)
        if self.global_rank == 0 and self._grid is not None and self.sample_dir is not None:
            self._write_grid(self._grid)
        self._grid = None
        super().on_validation_epoch_end()

    def _write_grid(self, grid: dict[str, Any]) -> None:
        import torch.nn.functional as F
        from torchvision.utils import make_grid, save_image

        rendered = grid["rendered"]
        sources = F.interpolate(grid["sources"], size=rendered.shape[-2:], mode="bilinear", antialias=True)
        image = make_grid(torch.cat([sources, rendered]).clamp(0, 1), nrow=len(sources))
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        stem = self.sample_dir / f"unified_step{self.global_step:07d}"
        save_image(image, stem.with_suffix(".png"))
        captions = "".join(f"{caption}\n" for caption in grid["captions"])
        stem.with_suffix(".txt").write_text(f"rows: source, regenerated; captions:\n{captions}")

    # ------------------------------------------------------------------ results and checkpoints
    def save_result(self, run_dir: Path) -> None:
        """Write `captioner/` (its adapters and record) and, in stage 2, `generator/` (the DiT's adapters merged).
        Call on every rank: under FSDP the trained network's shards are gathered first."""
        language_model = self.networks.captioner.language_model
        with self.ema_weights():
            adapters = gathered({n: p for n, p in language_model.named_parameters() if ".lora_" in n})
            generator = gathered_state_dict(self.networks.generator) if self.stage == 2 else None
        if self.global_rank != 0:
            return
        run_dir = Path(run_dir)
        captioner_meta = {**self.metadata["captioner_record"], "unified": self._lineage()}
        save_captioner(self.networks.captioner, run_dir / "captioner", self.captioner_lora, captioner_meta, adapters)
        if generator is not None:
            self._save_generator(run_dir / "generator", generator)
        log.info("saved the unified stage-%d result to %s", self.stage, run_dir)

    def _save_generator(self, out: Path, state: dict[str, torch.Tensor]) -> None:
        """The generator of its whole `state` with the trained DiT (adapters merged), in the saved-generator
        format of generation runs."""
        config = self.networks.generator.config.to_dict()
        base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
        model = from_state(config, base, "the trained generator")
        adapters = {k.removeprefix("dit."): v for k, v in state.items() if ".lora_" in k}
        if adapters:  # the same adapters on a whole copy, merged there by peft
            if self.dit_lora is None:
                raise ValueError("the DiT has adapters but no dit_lora spec was given")
            load_adapters(add_lora(model.dit, self.dit_lora), adapters, "the trained DiT")
            model = from_state(config, merged_state_dict(model), "the trained generator")
        meta = {**self.metadata["generator_record"], "init_from": self.metadata["generator_from"]}
        model.save_pretrained(out, meta=meta | {"unified": self._lineage()})
        self.networks.conditioner.text_tokenizer.save_pretrained(str(out / TEXT_TOKENIZER_DIR))

    def _lineage(self) -> dict[str, Any]:
        keep = ("generator_from", "captioner_from", "reward")
        return {"stage": self.stage, "trained": STAGES[self.stage], **{k: self.metadata.get(k) for k in keep}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["unilip"] = {
            "task": "unified",
            "stage": self.stage,
            "rng": gather_rng_states({"unified": self.rng.get_state()}),
            **{k: self.metadata.get(k) for k in ("generator_from", "captioner_from")},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("unilip", {})
        if state.get("task") != "unified" or state.get("stage") != self.stage:
            found = f"{state.get('task')} stage {state.get('stage')}"
            raise ValueError(f"checkpoint is {found}, this run unified stage {self.stage}")
        rng = restore_rng_states(state.get("rng"), self.global_rank)
        if "unified" in rng:
            self.rng.set_state(rng["unified"])
