"""Framework overhead: our Lightning training step vs a bare PyTorch loop doing the identical computation.

    python perf/overhead.py [--steps 40] [--repeats 5] [--threads 1] [--json overhead.json]

Both run the tiny preset, stage 2 with the GAN on (the full step: reconstruction, distillation
against the frozen teacher, generator and discriminator hinge terms, LeCam, one backward,
clipping, the finite check, AdamW, schedule, EMA), on the same in-memory batches, in fp32 on the
CPU, `--threads` intra-op threads each (one by default: on a machine other jobs share, two threads
wait on each other's preemption and a step takes 40x longer). Runs alternate, the order swapped in
every pair (Lightning, bare, bare, Lightning, ...), so that drift of the machine hits both; the
reported number is the median of the per-pair ratios of time per step, with their range and the
load average around each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from unilip.logs import quiet_third_party_noise
from unilip.models import UniLIPTokenizer
from unilip.models.presets import compose_config, tokenizer_preset
from unilip.tasks.tokenizer.module import frozen_parameters
from unilip.tasks.tokenizer.setup import build_tokenizer_training


def build(root: Path, steps: int):
    """The module users get from `experiment=quickstart stage=2`, and fixed batches."""
    torch.manual_seed(0)
    UniLIPTokenizer(tokenizer_preset("tiny")).save_pretrained(
        root / "init", training={"stage": 1, "encoder_trained": False, "teacher": None}
    )
    cfg = compose_config(
        "train",
        [
            "experiment=quickstart",
            "stage=2",
            f"init_from={root / 'init'}",
            f"run_dir={root / 'run'}",
            "stages.stage2.gan_start_step=0",
            "stages.stage2.image_size=112",
            f"stages.stage2.max_steps={steps}",
            "loss.perceptual_weight=0",
        ],
    )
    batches = [torch.rand(8, 3, 112, 112) for _ in range(steps)]
    return cfg, batches


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.end = time.perf_counter()


def lightning_step_time(cfg, batches, warmup: int) -> float:
    from lightning.pytorch.callbacks import ThroughputMonitor

    from unilip.training.run import batch_size

    module = build_tokenizer_training(cfg)
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        callbacks=[ThroughputMonitor(batch_size), timer],
    )
    loader = torch.utils.data.DataLoader([{"image": b} for b in batches], batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / (len(batches) - warmup)


def bare_step_time(cfg, batches, warmup: int) -> float:
    """The same computation as TokenizerTraining._training_step, written without Lightning."""
    module = build_tokenizer_training(cfg)
    module.configure_model()
    configured = module.configure_optimizers()  # {"optimizer", "lr_scheduler"}, the scheduler stepped by hand
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    tokenizer, disc, loss, teacher = module.tokenizer.train(), module.discriminator.train(), module.loss, module.teacher
    generator_params = [p for ps in module.groups.values() for p in ps]
    for index, images in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        out = tokenizer.reconstruct(images)
        terms = loss.reconstruction(images, out.images)
        terms |= loss.distillation(out.features, teacher.features(images))
        with frozen_parameters(disc):
            terms |= loss.generator_adversarial(disc(out.images))
        real, fake = disc(images), disc(out.images.detach())
        d_terms = loss.discriminator(real, fake, module.lecam(real, fake))
        total = sum(terms.values()) + sum(d_terms.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        norms = [
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
            for params in (generator_params, list(disc.parameters()))
        ]
        # the step's finite check of the loss and both gradient norms: one host read (non-fused AdamW)
        if not bool(torch.isfinite(torch.stack([total.detach(), *norms])).all().item()):
            continue
        optimizer.step()
        scheduler.step()
        module.lecam.update(real.detach(), fake.detach())
        module.ema.update()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_third_party_noise()
    torch.set_num_threads(args.threads)
    pairs, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg, batches = build(Path(tmp), args.steps)
        for repeat in range(args.repeats):
            load = os.getloadavg()[0]
            arms = [("lightning", lightning_step_time), ("bare", bare_step_time)]
            times = {name: arm(cfg, batches, args.warmup) for name, arm in arms[:: 1 if repeat % 2 == 0 else -1]}
            pairs.append((times["lightning"], times["bare"]))
            loads.append([load, os.getloadavg()[0]])
    ratios = [a / b for a, b in pairs]
    result = {
        "what": "tiny preset, stage 2 with GAN, 112 px, batch 8, fp32, CPU",
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "steps_timed_per_run": args.steps - args.warmup,
        "lightning_ms_per_step": [1000 * a for a, _ in pairs],
        "bare_ms_per_step": [1000 * b for _, b in pairs],
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "ratios": ratios,
        "load_average_1min_before_after": loads,
    }
    print(f"{'run':>4} {'Lightning ms/step':>18} {'bare ms/step':>13} {'ratio':>6} {'load':>10}")
    for index, ((a, b), ratio, load) in enumerate(zip(pairs, ratios, loads, strict=True)):
        print(f"{index:>4} {1000 * a:>18.1f} {1000 * b:>13.1f} {ratio:>6.3f} {load[0]:>4.1f}-{load[1]:<4.1f}")
    print(f"median ratio (Lightning / bare): {result['median_ratio']:.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
