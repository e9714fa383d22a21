"""Measure a tokenizer's latent statistics and store its latent scale with it.

    python -m unilip.evaluation.latent_stats TOKENIZER SHARDS [--write] [--samples 2000] [--size 448]
        [--batch-size 16] [--device cuda] [--preset unilip_1b]

The generation DiT learns `latents x scale` with scale = 1 / std of the latents over images (unit
variance, as SANA's DC-AE `scaling_factor`; the reference uses 10.6 and 9.5 for its released
tokenizers and subtracts no mean). Images are read as generation reads them (the whole image resized
to SIZE x SIZE). TOKENIZER is a saved tokenizer, a tokenizer run directory, a checkpoint or a released
`.pth` (with --preset); `--write` stores the scale in the saved tokenizer's config.json (`latent_scale`,
and the measurement under `latent_stats`), where generation training reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class LatentStats:
    """Mean and standard deviation of every latent element over `samples` images."""

    mean: float
    std: float
    samples: int
    elements: int

    @property
    def scale(self) -> float:
        return 1.0 / self.std


def measure(
    encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], samples: int
) -> LatentStats:
    """Latent statistics of `encode` over the first `samples` images of `batches` ((B, 3, H, W) in [0, 1]).

    Per-batch moments merged in float64 (Chan et al.'s parallel variance), so the result does not
    depend on the batch size and millions of elements lose no precision.
    """
    count, mean, m2, seen = 0, 0.0, 0.0, 0
    for images in batches:
        images = images[: samples - seen]
        latents = encode(images).double().flatten()
        n, batch_mean = latents.numel(), latents.mean().item()
        batch_m2 = (latents - batch_mean).square().sum().item()
        delta = batch_mean - mean
        mean += delta * n / (count + n)
        m2 += batch_m2 + delta * delta * count * n / (count + n)
        count += n
        seen += images.shape[0]
        if seen >= samples:
            break
    if count < 2:
        raise ValueError("no images were read; check the shards")
    return LatentStats(mean=mean, std=math.sqrt(m2 / (count - 1)), samples=seen, elements=count)


def write_scale(directory: Path, stats: LatentStats, data: str, size: int) -> Path:
    """Store `stats.scale` as `latent_scale` in a saved tokenizer's config.json (and the measurement beside it)."""
    from unilip.models.tokenizer import CONFIG_NAME, FORMAT

    config_file = Path(directory) / CONFIG_NAME
    meta = json.loads(config_file.read_text()) if config_file.exists() else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"--write needs a saved tokenizer directory; '{directory}' is not one")
    meta["config"]["latent_scale"] = stats.scale
    meta["latent_stats"] = {**asdict(stats), "scale": stats.scale, "data": data, "size": size}
    config_file.write_text(json.dumps(meta, indent=2))
    return config_file


def main(argv: list[str] | None = None) -> LatentStats:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="saved tokenizer, tokenizer run directory, checkpoint or released .pth")
    parser.add_argument("shards", help="image shards: a glob, brace pattern or path (training data)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--size", type=int, default=448, help="image side (448: the 16 x 16 latents of generation)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="model preset of a released .pth (unilip_1b, unilip_2b)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="store the scale in the saved tokenizer")
    args = parser.parse_args(argv)
    from unilip.logs import cli_logging, one_line_errors, output

    cli_logging()
    from unilip.data import ShardDataModule
    from unilip.data.shards import DataError
    from unilip.data.transforms import to_float
    from unilip.models.presets import tokenizer_preset
    from unilip.training.checkpoints import locate
    from unilip.training.config import ConfigError
    from unilip.training.lineage import load_any_tokenizer

    with one_line_errors(OSError, ValueError, DataError):
        source = Path(args.tokenizer)
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such tokenizer")
        located = locate(source, "tokenizer")
        if args.write and not (located / "config.json").exists():
            raise ConfigError(f"--write needs a saved tokenizer (or a run directory holding one); {source} is not")
        preset = tokenizer_preset(args.preset) if args.preset else None
        tokenizer = load_any_tokenizer(source, preset).tokenizer.to(args.device).eval()
        data = ShardDataModule(
            val_urls=args.shards,
            image_size=args.size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            resize="square",
            rank=0,
            world_size=1,
        )
        batches = (to_float(batch["image"].to(args.device)) for batch in data.val_dataloader())
        with torch.no_grad():
            stats = measure(tokenizer.encode, batches, args.samples)
        output(__name__).info(json.dumps({**asdict(stats), "scale": stats.scale}))
        if args.write:
            log.info("wrote latent_scale=%.4f to %s", stats.scale, write_scale(located, stats, args.shards, args.size))
    return stats


if __name__ == "__main__":
    main()
