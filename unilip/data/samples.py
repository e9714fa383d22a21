"""Bundled real photos: a small shard set built offline from the colour photographs scikit-image ships.

    build_photo_shards("data/photos")

writes, split by source photo (a validation photo never appears in training):

- `train-*.tar`       random crops/rescales of the training photos, `jpg` + true `txt` caption
- `val-*.tar`         the held-out photos, whole and cropped
- `edit-train-*.tar`  editing triplets `source.jpg`, `target.jpg`, `instruction.txt` (flip,
                      rotate, black and white, ...) made from the training photos
- `edit-val-*.tar`    the same from the validation photos
- `manifest.json`     what was written; written last, so its presence means the set is complete

The set is written in a private folder beside `out_dir` and moved in file by file, the manifest last:
a reader never sees half a shard, and two machines that build it onto one shared filesystem at once
write the same bytes (`ensure_photo_shards` builds it once per machine and makes the other processes wait).

It is the default data of the quick start (`conf/data/photos.yaml`): enough to see a tokenizer's
loss fall, and a generator learn text-to-image and editing, on real photographs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image, ImageOps

from unilip.data.shards import DataError, ShardSink

log = logging.getLogger(__name__)

# scikit-image test images that are colour photographs and ship inside the package (no pooch
# download): name -> (skimage.data function, a short caption that is true of the photo).
# Left out: colorwheel (synthetic), camera/moon/... (grayscale), and the images that need a download.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": (
        "astronaut",
        "a smiling astronaut in an orange spacesuit holding a helmet, in front of an American flag",
    ),
    "coffee": ("coffee", "an espresso in a red cup on a red saucer with a spoon, on a wooden table"),
    "motorcycle": ("stereo_motorcycle", "a red motorcycle parked in a garage full of boxes"),
    "hubble": ("hubble_deep_field", "a deep field of countless colourful galaxies on black space"),
    "tissue": ("immunohistochemistry", "a microscope image of tissue stained brown and blue"),
    "retina": ("retina", "a photograph of a human retina, orange with branching red blood vessels"),
    "cat": ("chelsea", "a close-up of a tabby cat with green eyes"),
    "rocket": ("rocket", "a white rocket on its launch pad between two towers at dusk"),
}
VAL_PHOTOS = ("cat", "rocket")

# Edit instructions and what they do to a square image.
EDITS: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "mirror": ("flip the image horizontally", ImageOps.mirror),
    "upside_down": ("turn the image upside down", ImageOps.flip),
    "gray": ("make it black and white", lambda im: im.convert("L").convert("RGB")),
    "rotate": ("rotate it 90 degrees clockwise", lambda im: im.transpose(Image.Transpose.ROTATE_270)),
    "zoom": ("zoom in on the center", lambda im: ImageOps.fit(im.crop(_center_half(im)), im.size)),
    "invert": ("invert the colors", ImageOps.invert),
}

MANIFEST = "manifest.json"


def _center_half(image: Image.Image) -> tuple[int, int, int, int]:
    w, h = image.size
    return w // 4, h // 4, w - w // 4, h - h // 4


def load_photo(name: str) -> Image.Image:
    """One bundled photo as an RGB PIL image (read from scikit-image's package data, offline)."""
    import skimage.data  # heavy: only when the photos are built

    pixels = getattr(skimage.data, PHOTOS[name][0])()
    if isinstance(pixels, tuple):  # stereo_motorcycle returns (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(pixels).convert("RGB")


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _random_crop(photo: Image.Image, rng: random.Random, min_side: int, max_side: int) -> Image.Image:
    """A random crop (aspect 3:4 to 4:3) rescaled to a random shorter edge in [min_side, max_side]."""
    w, h = photo.size
    short = min(w, h)
    side = rng.uniform(min(1.0, min_side / short), 1.0) * short
    aspect = rng.uniform(0.75, 4 / 3)
    cw, ch = min(w, round(side * aspect**0.5)), min(h, round(side / aspect**0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    target = min(rng.randint(min_side, max_side), min(cw, ch))  # downscale only: no blurry upscales
    scale = target / min(cw, ch)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)


def _shorter_edge_at_most(photo: Image.Image, side: int) -> Image.Image:
    scale = side / min(photo.size)
    if scale >= 1:
        return photo
    return photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)


def _square(photo: Image.Image, rng: random.Random, size: int) -> Image.Image:
    w, h = photo.size
    side = rng.randint(min(size, w, h), min(w, h))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)


def _caption_samples(photo: Image.Image, name: str, count: int, min_side: int, max_side: int, seed: int) -> list[dict]:
    """The whole photo, then `count - 1` random crops; all with the photo's caption."""
    caption = PHOTOS[name][1]
    rng = random.Random(f"{seed}/{name}")
    meta = json.dumps({"photo": name, "caption": caption}).encode()
    samples = []
    for i in range(count):
        crop = _shorter_edge_at_most(photo, max_side) if i == 0 else _random_crop(photo, rng, min_side, max_side)
        samples.append({"__key__": f"{name}_{i:03d}", "jpg": _jpeg(crop), "txt": caption.encode(), "json": meta})
    return samples


def _edit_samples(photo: Image.Image, name: str, crops: int, size: int, seed: int) -> list[dict]:
    """`crops` square crops of the photo, each edited by every operation in `EDITS`."""
    rng = random.Random(f"{seed}/{name}/edit")
    samples = []
    for i in range(crops):
        source = _square(photo, rng, size)
        for op, (instruction, edit) in EDITS.items():
            samples.append(
                {
                    "__key__": f"{name}_{op}_{i}",
                    "source.jpg": _jpeg(source),
                    "target.jpg": _jpeg(edit(source)),
                    "instruction.txt": instruction.encode(),
                }
            )
    return samples


def photo_shards_exist(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MANIFEST).exists()


def build_photo_shards(
    out_dir: str | Path,
    val_photos: tuple[str, ...] = VAL_PHOTOS,
    crops_per_photo: int = 48,
    val_crops_per_photo: int = 6,
    edit_crops_per_photo: int = 3,
    min_side: int = 224,
    max_side: int = 448,
    edit_size: int = 256,
    samples_per_shard: int = 64,
    seed: int = 0,
) -> dict:
    """Write the photo shards (see the module docstring) into `out_dir`; return the manifest.

    Args:
        val_photos: names from `PHOTOS` held out for validation.
        crops_per_photo / val_crops_per_photo: samples per training / validation photo; the
            first is the whole photo (shorter edge at most `max_side`), the rest random crops.
        edit_crops_per_photo: square crops per photo, each giving one triplet per edit in `EDITS`.
        min_side, max_side: shorter edge of the stored crops (JPEG quality 90).
        edit_size: side of the square editing images.
        samples_per_shard: shard size.
        seed: the same seed writes the same shards.
    """
    unknown = set(val_photos) - set(PHOTOS)
    if unknown:
        raise ValueError(f"val_photos: unknown {sorted(unknown)}; choose from {sorted(PHOTOS)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    _remove_abandoned_builds(out_dir, host)
    staging = out_dir.parent / f".{out_dir.name}.building-{host}-{os.getpid()}"
    try:
        crops = {"train": crops_per_photo, "val": val_crops_per_photo, "edit": edit_crops_per_photo}
        manifest = _write_photo_shards(
            staging, val_photos, crops, min_side, max_side, edit_size, samples_per_shard, seed
        )
        _move_into(staging, out_dir, prefixes=manifest["counts"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("photo shards in %s: %s", out_dir, manifest["counts"])
    return manifest


def _write_photo_shards(
    out_dir: Path,
    val_photos: tuple[str, ...],
    crops: dict[str, int],
    min_side: int,
    max_side: int,
    edit_size: int,
    samples_per_shard: int,
    seed: int,
) -> dict:
    splits = {"train": [n for n in PHOTOS if n not in val_photos], "val": list(val_photos)}
    counts: dict[str, int] = {}
    for split, names in splits.items():
        images: list[dict] = []
        edits: list[dict] = []
        for name in names:
            photo = load_photo(name)
            images += _caption_samples(photo, name, crops[split], min_side, max_side, seed)
            edits += _edit_samples(photo, name, crops["edit"] if split == "train" else 1, edit_size, seed)
        for prefix, samples in ((split, images), (f"edit-{split}", edits)):
            random.Random(f"{seed}/{prefix}").shuffle(samples)  # so that every shard holds a mix of photos
            with ShardSink(out_dir, prefix, samples_per_shard) as sink:
                for sample in samples:
                    sink.write(sample)
            counts[prefix] = len(samples)
    manifest = {"photos": splits, "captions": {n: c for n, (_, c) in PHOTOS.items()}, "counts": counts, "seed": seed}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _remove_abandoned_builds(out_dir: Path, host: str) -> None:
    """Delete the private folders of builds on this machine whose process is gone (killed mid-build)."""
    for folder in out_dir.parent.glob(f".{out_dir.name}.building-{host}-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _move_into(staging: Path, out_dir: Path, prefixes: Iterable[str]) -> None:
    """Move a finished build into `out_dir`: the `<prefix>-*.tar` a different or interrupted build left there
    go, then every file is renamed in (atomic on one filesystem), the manifest last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {path.name for path in staging.iterdir()}
    for prefix in prefixes:
        for stale in out_dir.glob(f"{prefix}-*.tar"):
            if stale.name not in built:
                stale.unlink(missing_ok=True)
    for name in [*sorted(built - {MANIFEST}), MANIFEST]:
        os.replace(staging / name, out_dir / name)


def ensure_photo_shards(out_dir: str | Path, builder: bool, timeout_s: float = 900, poll_s: float = 0.5) -> None:
    """The photo shards in `out_dir`, built once per machine: the builder (local rank 0) writes them if they
    are missing; every other process waits until the manifest, moved in last, is there.

    Needed before anything expands the shard globs, which the step plan does before Lightning's
    `prepare_data` (and its barrier) would run.
    """
    if photo_shards_exist(out_dir):
        return
    if builder:
        log.info("building the bundled photo shards in %s", out_dir)
        build_photo_shards(out_dir)
        return
    log.info("waiting for local rank 0 to build the bundled photo shards in %s", out_dir)
    deadline = time.monotonic() + timeout_s
    while not photo_shards_exist(out_dir):
        if time.monotonic() > deadline:
            raise DataError(
                f"waited {timeout_s:.0f} s for local rank 0 to build the bundled photo shards in {out_dir}; its "
                "error (or log) says why they are not there"
            )
        time.sleep(poll_s)
