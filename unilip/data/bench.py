"""Loader benchmark: images/s of the training loader from JPEG shards, per image size and worker count.

    python -m unilip.data.bench [--sizes 224 448] [--workers 0 1 2] [--batch-size 32] [--batches 40]
                                [--urls 'my/shards/*.tar'] [--json bench.json]

Without `--urls` it writes photo-like JPEG shards first (random crops of the bundled photos at
512x512 and 640x480, quality 90: the size of typical web training images). It also profiles one
image through each stage in the main process (decode with and without PIL's JPEG `draft`,
crop + resize, stacking into a uint8 batch, and the conversion to float that the training step does on
its device, here the CPU), to show where the time goes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from unilip.data.loaders import TrainLoader
from unilip.data.samples import PHOTOS, load_photo
from unilip.data.shards import ShardSink, SkipCounter, expand_urls, read_shard
from unilip.data.streams import TrainSource
from unilip.data.transforms import SampleTransform, collate, crop_box, decode_image, render, to_float
from unilip.logs import cli_logging

log = logging.getLogger(__name__)


def write_bench_shards(out_dir: Path, count: int = 256, per_shard: int = 64, seed: int = 0) -> list[str]:
    """`count` JPEGs (quality 90), alternately 512x512 and 640x480 crops of the bundled photos."""
    rng = random.Random(seed)
    photos = [load_photo(name) for name in PHOTOS]
    with ShardSink(out_dir, "bench", per_shard) as sink:
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = (512, 512) if i % 2 == 0 else (640, 480)
            scale = max(w / photo.width, h / photo.height, rng.uniform(0.5, 1.0))  # downscale: keeps detail
            resized = photo.resize((max(w, round(photo.width * scale)), max(h, round(photo.height * scale))))
            x, y = rng.randint(0, resized.width - w), rng.randint(0, resized.height - h)
            out = io.BytesIO()
            resized.crop((x, y, x + w, y + h)).save(out, "JPEG", quality=90)
            sink.write({"__key__": f"img{i:05d}", "jpg": out.getvalue(), "txt": b"a photo"})
        return list(sink.shards)


def loader_throughput(urls: list[str], size: int, workers: int, batch_size: int, batches: int) -> float:
    """Images/s of `TrainLoader` in steady state (the first batches, with worker start-up, are not timed)."""
    warmup = max(2, 2 * workers)
    loader = TrainLoader(
        [TrainSource("bench", tuple(urls), 1.0)],
        SampleTransform(size, train=True),
        batch_size,
        batches_per_epoch=warmup + batches,
        num_workers=workers,
        shuffle_buffer=64,
    )
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _ms(fn, repeat: int) -> float:
    """Milliseconds per call: the best of three blocks of `repeat` calls (a shared machine only adds time)."""
    blocks = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        blocks.append(1000 * (time.perf_counter() - start) / repeat)
    return min(blocks)


def stage_profile(urls: list[str], size: int, repeat: int = 20) -> dict[str, float]:
    """Milliseconds per image for each stage, in this process, averaged over a few images."""
    raws = [sample["jpg"] for _, sample in zip(range(8), read_shard(urls[0], SkipCounter()), strict=False)]
    rng = random.Random(0)
    decoded = [decode_image(data, size) for data in raws]
    examples = [{"image": np.zeros((size, size, 3), np.uint8), "caption": "", "key": ""}] * 32
    batch = collate(examples, False)["image"]
    n = repeat * len(raws)
    return {
        "decode_full_ms": _ms(lambda: [Image.open(io.BytesIO(d)).convert("RGB") for d in raws], repeat) / len(raws),
        "decode_draft_ms": _ms(lambda: [decode_image(d, size) for d in raws], repeat) / len(raws),
        "crop_resize_ms": _ms(
            lambda: [render(im, crop_box(*im.size, size, rng), size, False) for im in decoded], repeat
        )
        / len(raws),
        "collate_ms": _ms(lambda: collate(examples, False), max(1, n // 32)) / 32,
        "to_float_ms": _ms(lambda: to_float(batch), max(1, n // 32)) / 32,
    }


def machine() -> str:
    model = platform.processor() or "cpu"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__}"
    return f"{model}, {os.cpu_count()} CPU cores; {versions}"


def _measure(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        urls = expand_urls(args.urls) if args.urls else write_bench_shards(Path(tmp), args.images)
        rows = []
        for size in args.sizes:
            profile = stage_profile(urls, size)
            for workers in args.workers:
                # The best of a few runs: on a shared machine, other processes only ever slow a run down.
                rate = max(
                    loader_throughput(urls, size, workers, args.batch_size, args.batches) for _ in range(args.repeat)
                )
                rows.append(
                    {
                        "size": size,
                        "workers": workers,
                        "images_per_s": rate,
                        "per_worker": rate / max(1, workers),
                        **profile,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--repeat", type=int, default=1, help="measure each setting this often, keep the best")
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs (without --urls)")
    parser.add_argument("--urls", help="benchmark these shards (glob/brace pattern) instead of generated JPEGs")
    parser.add_argument("--json", type=Path, default=Path("loader_bench.json"))
    args = parser.parse_args(argv)
    # One thread, as in a DataLoader worker: with 0 workers the numbers are then one core's worth.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _measure(args)
    finally:
        torch.set_num_threads(threads)  # called in-process (tests, notebooks): leave the caller's setting
    lines = [
        f"Machine: {machine()}",
        f"{'size':>5} {'workers':>7} {'images/s':>9} {'per worker':>10} | ms/image in one process: "
        "decode (full / draft), crop+resize, collate, to float",
    ]
    for r in rows:
        lines.append(
            f"{r['size']:>5} {r['workers']:>7} {r['images_per_s']:>9.0f} {r['per_worker']:>10.0f} | "
            f"{r['decode_full_ms']:.2f} / {r['decode_draft_ms']:.2f}, {r['crop_resize_ms']:.2f}, "
            f"{r['collate_ms']:.3f}, {r['to_float_ms']:.3f}"
        )
    log.info("\n".join(lines))
    record = {"machine": machine(), "batch_size": args.batch_size, "repeat": args.repeat, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2))
    log.info("written %s", args.json)
    return 0


if __name__ == "__main__":
    cli_logging(fmt="%(message)s")
    raise SystemExit(main())
