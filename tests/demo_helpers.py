"""What the demo tests show the demo: two tiny tokenizers (an original and a "stage 2" whose encoder moved, recording
the first as its teacher), a run folder written by the training's own CSV logger, and photo files."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

RUN_STEPS = 10


def save_tokenizers(root: Path, tiny_config) -> tuple[Path, Path]:
    """The `tiny` preset with seed-0 weights (an original encoder, as after stage 1), and a copy whose encoder was
    moved by noise, saved with the lineage a stage-2 run writes (encoder trained, teacher = the first)."""
    from unilip.models import UniLIPTokenizer

    torch.manual_seed(0)
    original = UniLIPTokenizer(tiny_config).eval()
    first = root / "tokenizer-stage1"
    original.save_pretrained(first, training={"stage": 1, "encoder_trained": False, "teacher": None})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in original.named_parameters():
            if name.startswith(("vision_tower.", "multi_modal_projector.")):
                parameter.add_(0.05 * parameter.std().nan_to_num() * torch.randn(parameter.shape, generator=generator))
    second = root / "tokenizer-stage2"
    original.save_pretrained(second, training={"stage": 2, "encoder_trained": True, "teacher": str(first)})
    return first, second


def loss_at(step: int) -> float:
    """A falling, not quite smooth loss curve (hand values: what the plot must show)."""
    return round(0.5 / (1 + step) + 0.01 * (step % 3), 6)


def log_run(run: Path, steps: range) -> None:
    """Rows of `steps` into `run/logs/metrics.csv` through the training's CSV logger (as a tokenizer run logs:
    the loss every step, PSNR at validation), and a validation grid every 5 steps under `run/samples/`."""
    from unilip.training.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(run), name="logs", version="")
    for step in steps:
        logger.log_metrics({"loss/total": loss_at(step), "lr/decoder": 1e-4 * (step + 1) / 20}, step=step)
        if step % 5 == 4:
            logger.log_metrics({"val/psnr": 10.0 + step / 2}, step=step)
            grid_image(step).save(run / "samples" / f"reconstruction_step{step:07d}.png")
    logger.save()


def grid_image(step: int) -> Image.Image:
    """A validation grid as a tokenizer run writes one (inputs over reconstructions) that tells its step apart: the
    bottom row is blurred less at every step."""
    from PIL import ImageFilter
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    tiles = [Image.fromarray(photo).resize((96, 96), Image.Resampling.BICUBIC) for photo in photos]
    grid = Image.new("RGB", (96 * len(tiles), 192))
    for index, tile in enumerate(tiles):
        grid.paste(tile, (96 * index, 0))
        grid.paste(tile.filter(ImageFilter.GaussianBlur(8 / (1 + step))), (96 * index, 96))
    return grid


def make_run(run: Path) -> Path:
    """A tokenizer run that is training: config, logs and grids, no checkpoint yet."""
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text("task: tokenizer\nstage: 1\nname: demo\n")
    log_run(run, range(RUN_STEPS))
    return run


def photo_file(path: Path, size: tuple[int, int] = (300, 260)) -> Path:
    """scikit-image's astronaut at a size that is neither square nor a multiple of 28 (the crop matters), PNG."""
    from skimage import data as skdata

    Image.fromarray(skdata.astronaut()).resize(size, Image.Resampling.BICUBIC).save(path)
    return path
