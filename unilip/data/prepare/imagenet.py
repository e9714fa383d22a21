"""ImageNet-1k validation (the tokenizer's rFID / PSNR / SSIM) -> `val-*.tar` shards: `jpg` + `cls` + `json`.

Three downloads are read as published:

- Hugging Face `ILSVRC/imagenet-1k`: `data/val_images.tar.gz`, members `<image name>_<WNID>.JPEG` (the
  dataset's loading script takes the class from the name: `rsplit("_", 1)`). Read in archive order as
  a stream (a gzip file cannot be read out of order), twice: once for the names, once for the images.
- image-net.org: `ILSVRC2012_img_val.tar` (members `ILSVRC2012_val_00000001.JPEG`, ...) with the
  development kit `ILSVRC2012_devkit_t12.tar.gz`, whose `data/ILSVRC2012_validation_ground_truth.txt`
  gives each image's ILSVRC2012_ID (line i: image i) and `data/meta.mat` each ID's WNID (the leaf
  synsets, `num_children == 0`). Images are read straight out of the tar, in name order.
- Class folders `val/<WNID>/<image>` (or `<WNID>/<image>` at the top), as torchvision's ImageNet and
  most clusters keep it. In name order.

Each sample: the image's bytes (`jpg`; kept unless larger than `--max-size`), its key the image name
(`ILSVRC2012_val_00000001`), `cls` the class index among the sorted WNIDs (the usual ImageNet-1k label
when all 1000 classes are there) and `json` {"label", "class_name": WNID}.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from unilip.data.prepare.writer import Conversion, ImageRef, Inline, Record, TarMember
from unilip.errors import ConfigError, UnreadableFileError

log = logging.getLogger(__name__)

HUB_ARCHIVE = "val_images.tar.gz"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
WNID = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def plan(download: Path) -> Conversion:
    for archive in (download / "data" / HUB_ARCHIVE, download / HUB_ARCHIVE):
        if archive.is_file():
            return _hub(archive)
    if (download / VAL_TAR).is_file():
        return _official(download)
    for root in (download / "val", download):
        folders = [p for p in root.iterdir() if p.is_dir() and WNID.match(p.name)] if root.is_dir() else []
        if folders:
            return _class_folders(sorted(folders))
    raise ConfigError(
        f"{download} is not an ImageNet validation download: expected data/{HUB_ARCHIVE} (Hugging Face "
        f"ILSVRC/imagenet-1k), {VAL_TAR} with {DEVKIT} (image-net.org), or class folders val/n01440764/..."
    )


def _conversion(images: list[tuple[str, str]], read: Callable[[], Iterator[ImageRef]]) -> Conversion:
    """(key, WNID) per image in writing order, and the images' refs in the same order."""
    classes = sorted({wnid for _, wnid in images})
    if len(classes) != 1000:
        log.warning("%d classes found (ImageNet-1k has 1000): the `cls` labels are indices among these", len(classes))
    label = {wnid: i for i, wnid in enumerate(classes)}

    def records() -> Iterator[Record]:
        for (key, wnid), ref in zip(images, read(), strict=True):
            meta = json.dumps({"label": label[wnid], "class_name": wnid})
            yield Record(key, {"": ref}, {"cls": str(label[wnid]), "json": meta})

    return Conversion(records, len(images), [])


def _hub(archive: Path) -> Conversion:
    images = []
    for name in _stream_names(archive):
        stem = Path(name).name.rsplit(".", 1)[0]
        key, _, wnid = stem.rpartition("_")
        if not WNID.match(wnid):
            raise UnreadableFileError(f"{archive}: member {name} is not named <image>_<WNID>.JPEG")
        images.append((key, wnid))

    def read() -> Iterator[ImageRef]:
        with _open_stream(archive) as tar:
            for info in tar:
                if _is_image(info):
                    yield Inline(tar.extractfile(info).read(), f"{archive}:{info.name}")

    return _conversion(images, read)


def _stream_names(archive: Path) -> list[str]:
    try:
        with _open_stream(archive) as tar:
            return [info.name for info in tar if _is_image(info)]
    except (tarfile.TarError, EOFError) as error:  # a truncated download
        raise UnreadableFileError(f"{archive}: breaks off ({error}); download it again") from None


def _open_stream(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r|*")
    except tarfile.TarError as error:
        raise UnreadableFileError(f"{archive}: not a readable tar archive ({error}); download it again") from None


def _is_image(info: tarfile.TarInfo) -> bool:
    return info.isfile() and info.name.lower().endswith(IMAGE_SUFFIXES)


def _official(download: Path) -> Conversion:
    devkit = download / DEVKIT
    if not devkit.is_file():
        raise FileNotFoundError(f"{download} has {VAL_TAR} but not {DEVKIT}, which holds its labels: download it too")
    truth, meta = _devkit_files(devkit)
    ids = [int(line) for line in truth.decode().split()]
    wnid_of = _leaf_synsets(meta)
    members = {}
    try:
        with tarfile.open(download / VAL_TAR, "r:") as tar:
            for info in tar:
                if _is_image(info):
                    ref = TarMember(str(download / VAL_TAR), info.offset_data, info.size, info.name)
                    members[Path(info.name).name] = ref
    except tarfile.TarError as error:
        raise UnreadableFileError(f"{download / VAL_TAR}: not a readable tar archive ({error})") from None
    names = sorted(members)
    images = []
    for name in names:
        digits = re.search(r"(\d+)$", name.rsplit(".", 1)[0])  # ILSVRC2012_val_00000001 -> 1
        number = int(digits.group(1)) if digits else 0
        if not 1 <= number <= len(ids):
            raise UnreadableFileError(f"{VAL_TAR}: {name} has no line in the ground truth of {DEVKIT}")
        images.append((name.rsplit(".", 1)[0], wnid_of[ids[number - 1]]))
    return _conversion(images, lambda: (members[name] for name in names))


def _devkit_files(devkit: Path) -> tuple[bytes, bytes]:
    wanted = {"ILSVRC2012_validation_ground_truth.txt": None, "meta.mat": None}
    try:
        with tarfile.open(devkit, "r:*") as tar:
            for info in tar:
                if info.isfile() and Path(info.name).name in wanted and "/data/" in f"/{info.name}":
                    wanted[Path(info.name).name] = tar.extractfile(info).read()
    except tarfile.TarError as error:
        raise UnreadableFileError(f"{devkit}: not a readable tar archive ({error}); download it again") from None
    missing = [name for name, data in wanted.items() if data is None]
    if missing:
        raise UnreadableFileError(f"{devkit}: no data/{missing[0]} in it; is it the ILSVRC2012 development kit?")
    return wanted["ILSVRC2012_validation_ground_truth.txt"], wanted["meta.mat"]


def _leaf_synsets(meta: bytes) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of the classes (synsets without children) in the devkit's meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _class_folders(folders: list[Path]) -> Conversion:
    paths = [p for folder in folders for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    images = [(p.stem, p.parent.name) for p in paths]
    return _conversion(images, lambda: iter(paths))
