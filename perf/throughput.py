"""Step throughput, peak memory and model FLOPs utilisation of tokenizer and generation training.

    python perf/throughput.py                                   # tiny presets, CPU (runs anywhere)
    python perf/throughput.py --preset unilip_1b --device cuda --stages 1 2 g2 --sizes 224 448 \\
        --batch 224=32 448=16 --precision bf16-mixed [--compile true] [--json throughput.json]

Random weights and synthetic batches (no downloads, no data loading: `python -m unilip.data.bench`
measures the loader separately). Each configuration runs the real training step through Lightning:
tokenizer stages 1 and 2 (`TokenizerTraining`, the full recipe objective: L2, LPIPS, ConvNeXt
logits, distillation and the GAN in stage 2) at every `--sizes`, and generation stage 2 (`g2`,
`GenerationTraining`: frozen InternVL LLM, connector, SANA DiT, UniLIP latents) at the recipe's
448 px (56 px for `tiny`), one third of each batch edits (the recipe's mix), 128-token prompts;
`g2c` is the same step on cached targets (`python -m unilip.tasks.generation.cache_latents`: the batch holds the
latents and the edits' source features, and the step runs no encoder).
Model FLOPs per step (forward + backward, the frozen networks' forwards included) are counted once
with `torch.utils.flop_counter` on the first step; MFU = FLOPs per step / time per step / peak
(`--peak-tflops`, default 989 = H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from unilip.logs import quiet_third_party_noise
from unilip.models.generator import UniLIPGenerator, build_dit
from unilip.models.latents import UniLIPLatents, latent_grid
from unilip.models.mllm import build_conditioner
from unilip.models.presets import compose_config
from unilip.models.tokenizer import FrozenEncoder

# tokenizer preset -> (mllm preset, dit preset, generation image size) of the same UniLIP model
GENERATION_PRESETS = {
    "tiny": ("tiny", "tiny", 56),
    "unilip_1b": ("internvl3_1b", "sana_600m", 448),
    "unilip_2b": ("internvl3_2b", "sana_1600m", 448),
}


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        timed = self.times[self.warmup :]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def tokenizer_module(preset: str, stage: int, size: int, steps: int, args) -> L.LightningModule:
    overrides = [
        f"model={preset}",
        "model.internvl_weights=null",
        "model.decoder_weights=null",
        f"stage={stage}",
        f"stages.stage{stage}.image_size={size}",
        f"stages.stage{stage}.max_steps={steps}",
        "run_dir=/tmp/bench",
        f"stages.stage{stage}.gan_start_step={0 if stage == 2 else 10**9}",
        f"module.compile={args.compile}",
        f"module.gradient_checkpointing={args.gradient_checkpointing}",
        f"module.channels_last={args.channels_last}",
    ]
    cfg = compose_config("train", overrides)
    tokenizer = instantiate(cfg.model, device=None)
    return instantiate(
        cfg.module,
        tokenizer=tokenizer,
        loss=instantiate(cfg.loss),
        discriminator=instantiate(cfg.discriminator) if stage == 2 else None,
        teacher=FrozenEncoder(tokenizer) if stage == 2 else None,
        metadata={},
    )


def generation_module(preset: str, steps: int, args) -> L.LightningModule:
    """Generation stage 2 at real (or tiny) size with random weights; the byte-level text tokenizer
    stands in for InternVL's (prompt lengths are set in tokens, so the cost is the same)."""
    mllm, dit, size = GENERATION_PRESETS[preset]
    cfg = compose_config(
        "train",
        [
            "task=generate",
            "stage=2",
            f"model={preset}",
            "model.internvl_weights=null",
            "model.decoder_weights=null",
            f"mllm={mllm}",
            "mllm.weights=null",
            "mllm.text_tokenizer=null",
            "mllm.internvl.image_token_id=261",  # <IMG_CONTEXT> of the byte-level tokenizer
            f"dit={dit}",
            "dit.weights=null",
            f"stages.stage2.image_size={size}",
            f"stages.stage2.max_steps={steps}",
            "run_dir=/tmp/bench",
            f"module.gradient_checkpointing={args.gradient_checkpointing}",
            f"module.frozen_dtype={'bfloat16' if args.precision.startswith('bf16') else 'null'}",
        ],
    )
    tokenizer = instantiate(cfg.model, device=None)
    mllm_preset = instantiate(cfg.mllm)
    conditioner = build_conditioner(mllm_preset, tokenizer)
    generator = UniLIPGenerator.from_language_model(
        conditioner.language_model, build_dit(instantiate(cfg.dit)), **cfg.generator
    )
    latents = UniLIPLatents(tokenizer, cfg.latent_scale or tokenizer.config.latent_scale or 1.0)
    return instantiate(cfg.module, generator=generator, conditioner=conditioner, latents=latents, metadata={})


def generation_batch(batch: int, size: int, cached=None) -> dict:
    """A third of the rows edits; `cached` (the module): latents and source features instead of uint8 images."""
    edits = torch.arange(batch) % 3 == 2
    common = {"has_source": edits, "caption": ["a" * 128] * batch, "key": [str(i) for i in range(batch)]}
    if cached is not None:
        grid, conditioner = latent_grid(size), cached.conditioner
        width = conditioner.tokenizer.config.llm_hidden_size
        features = torch.randn(int(edits.sum()), conditioner.num_image_tokens, width, dtype=torch.bfloat16)
        return {
            "latent": torch.randn(batch, 32, grid, grid, dtype=torch.bfloat16),
            "source_features": features,
        } | common
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)  # what the loaders deliver
    return {"image": images, "source_image": images.flip(0)} | common


def measure(preset: str, stage: str, size: int, batch: int, steps: int, args) -> dict:
    if stage in ("g2", "g2c"):
        size = GENERATION_PRESETS[preset][2]
        module = generation_module(preset, steps, args)
        sample = generation_batch(batch, size, cached=module if stage == "g2c" else None)
    else:
        module = tokenizer_module(preset, int(stage), size, steps, args)
        sample = {"image": torch.rand(batch, 3, size, size)}
    device = torch.device(args.device)
    timer = _Timer(warmup=min(5, steps - 2))
    loader = torch.utils.data.DataLoader([sample] * steps, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.seconds_per_step()
    flops = module.flops_per_batch
    row = {
        "preset": preset,
        "stage": stage,
        "size": size,
        "batch": batch,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "compile": args.compile,
        "images_per_s": batch / seconds,
        "ms_per_step": 1000 * seconds,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--stages", nargs="+", default=["1", "2", "g2"], help="1, 2 (tokenizer), g2 (generation), g2c (cached targets)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", nargs="+", default=["224=8", "448=4"], help="SIZE=BATCH per image size")
    parser.add_argument("--generation-batch", type=int, default=8, help="batch of the g2 rows")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", default="false", help="false, true (inductor) or a backend name")
    parser.add_argument("--gradient-checkpointing", default="false")
    parser.add_argument("--channels-last", default="false")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_third_party_noise()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batches = {int(k): int(v) for k, v in (item.split("=") for item in args.batch)}
    rows = [
        measure(args.preset, stage, size, batches[size], args.steps, args)
        for stage in args.stages
        if stage not in ("g2", "g2c")
        for size in args.sizes
    ]
    rows += [
        measure(args.preset, stage, 0, args.generation_batch, args.steps, args)
        for stage in args.stages
        if stage in ("g2", "g2c")
    ]
    header = f"{'preset':>10} {'stage':>5} {'size':>4} {'batch':>5} {'img/s':>8} {'ms/step':>8} {'TFLOP/step':>10}"
    print(header + f" {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(
            f"{r['preset']:>10} {r['stage']:>5} {r['size']:>4} {r['batch']:>5} {r['images_per_s']:>8.2f} "
            f"{r['ms_per_step']:>8.1f} {r['model_tflop_per_step']:>10.4f} {r['achieved_tflops']:>8.3f} "
            f"{mfu:>6} {memory:>8}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
