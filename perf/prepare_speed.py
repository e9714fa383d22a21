"""Time of `python -m unilip.data.prepare` per million samples, per dataset family, with 1 and 2 processes.

    python perf/prepare_speed.py [--samples 120] [--repeats 3] [--json docs/measurements/prepare_cpu.json]

Each family gets a synthetic download in its published layout, of `--samples` samples whose images have
the sizes and formats of the real ones, made from scikit-image's bundled photographs (natural content,
so that PNG and JPEG sizes, hence decode times, are realistic):

- gpt-image-edit, sharegpt4o-edit: an input and an output PNG of 1024 x 1024 (GPT-Image-1 and GPT-4o output
  1024-px PNGs) with an instruction;
- sharegpt4o-t2i: one 1024 x 1024 PNG with its prompt;
- imagenet: one 500 x 375 JPEG (quality 90), the typical ImageNet validation image, from the HF tar.gz;
- blip3o (in place: BLIP3o-Pretrain, JourneyDB, BLIP3o-60k): webdataset shards of a 1024 x 768 JPEG
  (quality 90) and a caption each. The published images' sizes are not stated on the cards; time scales
  with pixels.

Runs alternate (1 process, 2 processes, 1, 2, ...) so that drift of the machine hits both; each run starts
from an empty out folder. Reported, per million samples (median over repeats, min and max): the wall
time, and the CPU time of all the run's processes (user + system, `getrusage`): the core-seconds a
million samples cost, which a shared, loaded machine inflates much less than the wall time. The load
average at the start is recorded with them.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unilip.data.prepare.datasets import prepare
from unilip.data.samples import PHOTOS, load_photo


def _photo(i: int, size: tuple[int, int]) -> Image.Image:
    names = list(PHOTOS)
    photo = load_photo(names[i % len(names)]).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(i).normal(0, 3, (size[1], size[0], 3))  # sensor-like grain: no flat areas
    return Image.fromarray(np.clip(np.asarray(photo, np.float32) + noise, 0, 255).astype(np.uint8))


def _encoded(i: int, size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    _photo(i, size).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_downloads(root: Path, n: int) -> dict[str, Path]:
    """One synthetic download per family; distinct images are cycled (encoding thousands costs minutes)."""
    pngs = [_encoded(i, (1024, 1024), "PNG") for i in range(8)]
    jpeg_large = [_encoded(i, (1024, 768), "JPEG") for i in range(8)]
    jpeg_val = [_encoded(i, (500, 375), "JPEG") for i in range(8)]
    gpt = root / "GPT-Image-Edit-1.5M"
    (gpt / "training_json").mkdir(parents=True)
    (gpt / "gptedit.txt").write_text("gpt-edit/omniedit,training_json/omniedit_gpt.json,false\n")
    records = []
    for i in range(n):
        for side in ("input", "output"):
            path = gpt / "gpt-edit" / "omniedit" / side / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pngs[(2 * i + (side == "output")) % len(pngs)])
        turns = [{"from": "human", "value": f"<image>\nedit number {i}"}, {"from": "gpt", "value": "<image>"}]
        records.append({"image": [f"input/{i:06d}.png", f"output/{i:06d}.png"], "conversations": turns})
    (gpt / "training_json" / "omniedit_gpt.json").write_text(json.dumps(records))

    share = root / "ShareGPT-4o-Image"
    share.mkdir()
    files = {f"text_to_image/{i:06d}.png": pngs[i % len(pngs)] for i in range(n)}
    files |= {
        f"text_and_image_to_image/{side}/{i:06d}.png": pngs[(i + k) % len(pngs)]
        for i in range(n)
        for k, side in enumerate(("in", "out"))
    }
    _tar(share / "images.tar", files)
    t2i = [{"input_prompt": f"prompt {i}", "output_image": f"text_to_image/{i:06d}.png"} for i in range(n)]
    edit = [
        {
            "input_prompt": f"edit {i}",
            "input_image": [f"text_and_image_to_image/in/{i:06d}.png"],
            "output_image": f"text_and_image_to_image/out/{i:06d}.png",
        }
        for i in range(n)
    ]
    (share / "text_to_image.json").write_text(json.dumps(t2i))
    (share / "text_and_image_to_image.json").write_text(json.dumps(edit))

    wnids = [f"n{1440764 + k:08d}" for k in range(10)]
    val = {f"ILSVRC2012_val_{i + 1:08d}_{wnids[i % 10]}.JPEG": jpeg_val[i % len(jpeg_val)] for i in range(n)}
    _tar(root / "imagenet-1k" / "data" / "val_images.tar.gz", val, mode="w:gz")

    blip = root / "BLIP3o-Pretrain"
    per_shard = max(1, n // 8)
    for s in range(0, n, per_shard):
        members = {}
        for i in range(s, min(n, s + per_shard)):
            members |= {f"{i:09d}.jpg": jpeg_large[i % len(jpeg_large)], f"{i:09d}.txt": f"caption {i}".encode()}
        _tar(blip / f"{s // per_shard:05d}.tar", members)
    return {
        "gpt-image-edit": gpt,
        "sharegpt4o-t2i": share,
        "sharegpt4o-edit": share,
        "imagenet": root / "imagenet-1k",
        "blip3o-pretrain": blip,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        downloads = make_downloads(root, args.samples)
        load = os.getloadavg()[0]
        for name, download in downloads.items():
            walls: dict[int, list[float]] = {1: [], 2: []}
            cpus: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.repeats):
                for workers in (1, 2):
                    out = root / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    cpu, start = _cpu(), time.perf_counter()
                    report = prepare(name, download, out, workers=workers, samples_per_shard=max(1, args.samples // 8))
                    walls[workers].append(time.perf_counter() - start)
                    cpus[workers].append(_cpu() - cpu)
                    assert report["samples"] == args.samples, report
            results[name] = {
                f"{w}_process{'es' if w > 1 else ''}": {
                    "wall_s_per_million": _spread([t / args.samples * 1e6 for t in walls[w]]),
                    "cpu_s_per_million": _spread([t / args.samples * 1e6 for t in cpus[w]]),
                }
                for w in walls
            }
            print(name, json.dumps(results[name]))
    out = {
        "samples": args.samples,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def _cpu() -> float:
    """User + system seconds of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values)), "min": round(min(values)), "max": round(max(values))}


if __name__ == "__main__":
    main()
