"""Miniatures of the recipe's downloads, as published, for `python -m unilip.data.prepare`.

Where each layout fact comes from (file names, fields, nesting; the images' own file names inside a
dataset are opaque paths to every reader, so the ones below are placeholders):

- BLIP3o-Pretrain-{Short,Long}-Caption, BLIP3o-Pretrain-JourneyDB, BLIP3o-60k: `.tar` webdataset
  shards, one sample = `<key>.jpg` + `<key>.txt` (the dataset cards: "All images and their captions are
  compressed into tar archives"; the authors' training reads the columns `jpg` and `txt`: nnnth/UniLIP
  `unilip/train/train_stage2.py` and `train_stage3.py`, `rename_column("jpg", "output_image")`,
  `rename_column("txt", "input_prompt")`, over `glob(<folder>/*.tar)`; `data/prepare_gen_sft.sh` moves
  `BLIP3o-60k/*.tar` into the SFT folder as they are).
- GPT-Image-Edit-1.5M: nnnth/UniLIP `data/convert_gpt_edit.py` reads `<root>/gptedit.txt`, lines
  `img_dir,json_name,_`, joins `json_name` and `img_dir` to the root, takes each record's `image` list
  (input(s) then output, paths relative to `img_dir`), keeps records with exactly 2 images ("only single
  turn"), and cleans `conversations[0]['value']` with `.replace('<image>', '').replace('\\n', '')`.
  wyhlovecpp/GPT-Image-Edit README ("Data preparation"): the list file's lines (e.g.
  `data/gpt-edit/hqedit/edit,training_json/hqedit_gpt_edit.json,false`), the JSONs from
  UCSC-VLAA/gpt-image-edit-training `training_json/`; `univa/dataset/qwen2vl_dataset.py`: records are
  LLaVA-style (`conversations`: `{"from": "human" | "gpt", "value": ...}`, the human turn carrying `<image>`).
- ShareGPT-4o-Image: nnnth/UniLIP `data/convert_janus4o_t2i.py` (`text_to_image.json`: `input_prompt`,
  `output_image` relative to the download) and `convert_janus4o_ti2i.py` (`text_and_image_to_image.json`:
  `input_prompt`, `input_image` a list with one path, `output_image`); `data/untar_sharegpt.sh` unpacks the
  download's top-level `*.tar` in place, so the archives' member names are those relative paths;
  FreedomIntelligence/ShareGPT-4o-Image `train_janus.py` joins the paths to the JSON's folder too.
- ImageNet-1k validation: Hugging Face ILSVRC/imagenet-1k `data/val_images.tar.gz`, members
  `<IMAGE_FILENAME>_<SYNSET_ID>.JPEG` (its loading script: `os.path.basename(root).rsplit("_", 1)`);
  image-net.org `ILSVRC2012_img_val.tar` (`ILSVRC2012_val_00000001.JPEG`, ...) and
  `ILSVRC2012_devkit_t12.tar.gz` with `data/ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per
  image, in order) and `data/meta.mat` (`synsets`: ILSVRC2012_ID, WNID, words, gloss, num_children, ...;
  the 1000 classes have num_children 0), as torchvision's `datasets.imagenet` parses them.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size=(40, 30), fmt: str = "PNG") -> bytes:
    """A smooth random image (JPEG keeps it close) of `size`, encoded as `fmt`."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(out, fmt)
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def tar_of(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    """A tar archive with `members` (name -> bytes) in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class Expected:
    """What `prepare` must make of a miniature: key -> members (bytes), in order; named skips; left out."""

    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # a fragment of each skip line (a file name)
    not_selected: list[str] = field(default_factory=list)  # "<item>: <reason fragment>"
    in_shards: dict[str, dict[str, bytes]] | None = None  # in place: the shards keep their bad samples


# ----------------------------------------------------------------------------------- webdataset sources
def blip3o_download(root: Path, shards: int = 3, per_shard: int = 3, seed: int = 0) -> Expected:
    """`<root>/<nnnnn>.tar` shards of jpg + txt; one sample's jpg is truncated, one more shard breaks off."""
    expected = Expected(in_shards={})
    for s in range(shards):
        members = {}
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            jpg, txt = image_bytes(seed + 100 * s + i, fmt="JPEG"), f"A photo, number {s}-{i}.".encode()
            if (s, i) == (1, 1):
                jpg = jpg[: len(jpg) // 3]
                expected.skipped.append(f"{s:05d}.tar:{key}: jpg does not decode")
            else:
                expected.samples[key] = {"jpg": jpg, "txt": txt}
            expected.in_shards[key] = {"jpg": jpg, "txt": txt}
            members |= {f"{key}.jpg": jpg, f"{key}.txt": txt}
        tar_of(root / f"{s:05d}.tar", members)
    broken = tar_of(root / f"{shards:05d}.tar", {"x.jpg": image_bytes(99, fmt="JPEG"), "x.txt": b"cut off"})
    broken.write_bytes(broken.read_bytes()[:700])  # a truncated download
    expected.skipped.append(f"{shards:05d}.tar")
    return expected


# ----------------------------------------------------------------------------------- GPT-Image-Edit-1.5M
def _conversation(instruction: str, turns: int = 1) -> list[dict]:
    out = []
    for t in range(turns):
        out += [
            {"from": "human", "value": f"<image>\n{instruction} (turn {t})" if turns > 1 else f"<image>\n{instruction}"}
        ]
        out += [{"from": "gpt", "value": "<image>"}]
    return out


def gpt_image_edit_download(root: Path, records: int = 5, size=(40, 30), list_name: str = "gptedit.txt") -> Expected:
    """Two parts (hqedit/edit, omniedit); part 2 also has a multi-turn record, a one-image record, a record
    whose output is missing and one whose input does not decode."""
    expected = Expected()
    parts = [
        ("gpt-edit/hqedit/edit", "training_json/hqedit_gpt_edit.json"),
        ("gpt-edit/omniedit", "training_json/omniedit_gpt.json"),
    ]
    write(root / list_name, "".join(f"{images},{annotation},false\n" for images, annotation in parts))
    number = 0
    for p, (images, annotation) in enumerate(parts):
        items = []
        for r in range(records):
            source, target = f"input/{p}_{r:04d}.png", f"output/{p}_{r:04d}.png"
            source_bytes = write(root / images / source, image_bytes(1000 * p + 2 * r, size)).read_bytes()
            target_bytes = write(root / images / target, image_bytes(1000 * p + 2 * r + 1, size)).read_bytes()
            instruction = f"Make the sky {['pink', 'green', 'grey'][r % 3]}\nand keep the <image> rest."
            items.append({"id": f"{p}-{r}", "image": [source, target], "conversations": _conversation(instruction)})
            expected.samples[f"{number:08d}"] = {
                "source.png": source_bytes,
                "target.png": target_bytes,
                "instruction.txt": instruction.replace("<image>", "").replace("\n", "").encode(),
            }
            number += 1
        if p == 1:
            three = ["input/multi_0.png", "input/multi_1.png", "output/multi.png"]
            for name in three:
                write(root / images / name, image_bytes(7, size))
            items.append({"id": "multi", "image": three, "conversations": _conversation("Then again", turns=2)})
            expected.not_selected.append(f"omniedit_gpt.json[{records}]: not a single-turn edit (3 image")
            items.append({"id": "one", "image": "input/multi_0.png", "conversations": _conversation("Alone")})
            expected.not_selected.append(f"omniedit_gpt.json[{records + 1}]: not a single-turn edit (1 image")
            write(root / images / "input/gone.png", image_bytes(8, size))
            items.append(
                {"id": "gone", "image": ["input/gone.png", "output/gone.png"], "conversations": _conversation("Gone")}
            )
            expected.skipped.append("output/gone.png: no such file")
            write(root / images / "input/bad.png", b"not a PNG at all")
            write(root / images / "output/bad.png", image_bytes(9, size))
            items.append(
                {"id": "bad", "image": ["input/bad.png", "output/bad.png"], "conversations": _conversation("Bad")}
            )
            expected.skipped.append("input/bad.png: ValueError: not an image PIL can read")
        write(root / annotation, json.dumps(items))
    return expected


# ----------------------------------------------------------------------------------- ShareGPT-4o-Image
def sharegpt4o_download(root: Path, records: int = 4, packed: bool = True) -> tuple[Expected, Expected]:
    """text_to_image.json and text_and_image_to_image.json with their images in two top-level tars
    (`packed`) or unpacked as `untar_sharegpt.sh` leaves them; the edits include a two-input record."""
    t2i, edit = Expected(), Expected()
    files: dict[str, bytes] = {}
    t2i_items, edit_items = [], []
    for r in range(records):
        out = f"text_to_image/{r:05d}.png"
        files[out] = image_bytes(3000 + r)
        prompt = f'A lighthouse at dusk, view {r}, "quoted" and <image> kept as is.'
        t2i_items.append({"input_prompt": prompt, "output_image": out})
        t2i.samples[f"{r:08d}"] = {"png": files[out], "txt": prompt.encode()}
        source, target = f"text_and_image_to_image/input/{r:05d}.png", f"text_and_image_to_image/output/{r:05d}.png"
        files[source], files[target] = image_bytes(4000 + r), image_bytes(5000 + r)
        edit_items.append({"input_prompt": f"Paint it blue, {r}", "input_image": [source], "output_image": target})
        edit.samples[f"{r:08d}"] = {
            "source.png": files[source],
            "target.png": files[target],
            "instruction.txt": f"Paint it blue, {r}".encode(),
        }
    edit_items.insert(1, {"input_prompt": "Merge", "input_image": [source, target], "output_image": target})
    edit.not_selected.append("text_and_image_to_image.json[1]: 2 input images")
    write(root / "text_to_image.json", json.dumps(t2i_items))
    write(root / "text_and_image_to_image.json", json.dumps(edit_items))
    if packed:
        tar_of(root / "text_to_image.tar", {k: v for k, v in files.items() if k.startswith("text_to_image/")})
        tar_of(root / "text_and_image_to_image.tar", {k: v for k, v in files.items() if k.startswith("text_and_")})
    else:
        for name, data in files.items():
            write(root / name, data)
    return t2i, edit


# ----------------------------------------------------------------------------------- ImageNet validation
WNIDS = ["n01440764", "n01443537", "n02119789"]  # tench, goldfish, kit fox


def imagenet_images(count: int = 7) -> list[tuple[str, str, bytes]]:
    """(image name, WNID, JPEG bytes) of `count` validation images, classes in turn."""
    return [
        (f"ILSVRC2012_val_{i + 1:08d}", WNIDS[(i * 2) % 3], image_bytes(6000 + i, (50, 37), "JPEG"))
        for i in range(count)
    ]


def imagenet_expected(images) -> Expected:
    expected = Expected()
    label = {wnid: i for i, wnid in enumerate(sorted(WNIDS))}
    for name, wnid, data in images:
        meta = json.dumps({"label": label[wnid], "class_name": wnid}).encode()
        expected.samples[name] = {"jpg": data, "cls": str(label[wnid]).encode(), "json": meta}
    return expected


def imagenet_hub_download(root: Path) -> Expected:
    images = imagenet_images()
    tar_of(root / "data" / "val_images.tar.gz", {f"{n}_{w}.JPEG": d for n, w, d in images}, mode="w:gz")
    return imagenet_expected(images)


def imagenet_official_download(root: Path) -> Expected:
    from scipy.io import savemat

    images = imagenet_images()
    ids = {"n02119789": 1, "n01440764": 449, "n01443537": 450}  # ILSVRC2012_IDs (not in WNID order)
    tar_of(root / "ILSVRC2012_img_val.tar", {f"{n}.JPEG": d for n, _, d in reversed(images)})
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    synsets = np.zeros((len(ids) + 1, 1), dtype=[(f, "O") for f in fields])
    rows = [(i, w, 0) for w, i in ids.items()] + [(1001, "n00001740", 3)]  # a parent synset: not a class
    for row, (i, wnid, children) in enumerate(rows):
        synsets[row, 0] = (
            np.array([[i]]),
            np.array([wnid]),
            np.array(["w"]),
            np.array(["g"]),
            np.array([[children]]),
            np.array([[0]]),
            np.array([[1300]]),
        )
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for _, w, _ in images).encode()
    tar_of(
        root / "ILSVRC2012_devkit_t12.tar.gz",
        {
            "ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
        },
        mode="w:gz",
    )
    return imagenet_expected(images)


def imagenet_class_folders(root: Path) -> Expected:
    images = imagenet_images()
    for name, wnid, data in images:
        write(root / "val" / wnid / f"{name}.JPEG", data)
    return imagenet_expected(images)
