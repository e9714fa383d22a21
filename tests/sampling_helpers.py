"""A tiny saved generator (as training writes `<run>/generator`) and small files in each benchmark's format."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from unilip.models.toy import save_toy_generator


def save_tiny_generator(root: Path, tiny_config) -> Path:
    """The quick-start generator with random weights (seed 0, 8 queries; its tokenizer is the `tiny` preset,
    `tiny_config`), saved as training saves one. Returns the generator directory."""
    return save_toy_generator(root, num_queries=8, seed=0)


def photo_files(directory: Path, names: list[str], side: int = 40) -> list[Path]:
    """Small real photos (scikit-image's) written as JPEGs under `directory` at the given relative names."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    paths = []
    for index, name in enumerate(names):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[index % len(photos)]).resize((side + 8 * index, side)).save(path)
        paths.append(path)
    return paths


# GenEval's prompts/evaluation_metadata.jsonl (djghosh13/geneval): one JSON object per line.
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "two_object",
        "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}],
        "prompt": "a photo of a toilet and a bicycle",
    },
    {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks",
    },
]


def geneval_prompts(directory: Path) -> Path:
    path = directory / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    return path


def dpg_prompts(directory: Path) -> Path:
    """DPG-Bench's dpg_bench/prompts/<item_id>.txt (TencentQQGYLab/ELLA): one prompt per file."""
    folder = directory / "prompts"
    folder.mkdir(parents=True)
    for item, text in {
        "partiprompts1": "A red cube on a blue sphere.",
        "whoops7": "A cat reading a newspaper.",
    }.items():
        (folder / f"{item}.txt").write_text(text + "\n")
    return folder


# WISE's data/*.json (PKU-YuanGroup/WISE): lists of {prompt_id, Prompt, Explanation, Category, Subcategory},
# one prompt of each of the six categories the overall score weighs.
def _wise(prompt_id, prompt, explanation, category, subcategory):
    return {"prompt_id": prompt_id, "Prompt": prompt, "Explanation": explanation, "Category": category,
            "Subcategory": subcategory}  # fmt: skip


WISE_FILES = {
    "cultural_common_sense.json": [
        _wise(1, "Traditional food of the Mid-Autumn Festival", "Mooncakes", "Cultural knowledge", "Festival"),
    ],
    "spatio-temporal_reasoning.json": [
        _wise(401, "A clock showing noon", "Both hands at 12", "Time", "Horizontal time"),
        _wise(568, "The view from the top of Mount Everest", "Snowy peaks", "Space", "Geographical location"),
    ],
    "natural_science.json": [
        _wise(701, "A plant growing toward a window", "Phototropism", "Biology", "Plant"),
        _wise(801, "A straw in a glass of water", "It looks bent", "Physics", "Optics"),
        _wise(901, "Copper in a flame", "A green flame", "Chemistry", "Flame"),
    ],
}


def wise_prompts(directory: Path) -> Path:
    folder = directory / "data"
    folder.mkdir(parents=True)
    for name, items in WISE_FILES.items():
        (folder / name).write_text(json.dumps(items, indent=2))
    return folder


# ImgEdit-Bench's Benchmark/Basic/basic_edit.json (PKU-YuanGroup/ImgEdit): {key: {id, prompt, edit_type}},
# `id` relative to the original images' root.
IMGEDIT_EDITS = {
    "1082": {"id": "animal/000342021.jpg", "prompt": "Change the shell texture to smooth.", "edit_type": "alter"},
    "673": {"id": "style/000278574.jpg", "prompt": "Transfer the image into ukiyo-e style.", "edit_type": "style"},
    "97": {"id": "for_add/000236569.jpg", "prompt": "Add a chandelier to the ceiling.", "edit_type": "add"},
}


def imgedit_prompts(directory: Path) -> tuple[Path, Path]:
    images = directory / "singleturn"
    photo_files(images, [item["id"] for item in IMGEDIT_EDITS.values()])
    path = directory / "basic_edit.json"
    path.write_text(json.dumps(IMGEDIT_EDITS, indent=4))
    return path, images


# GEdit-Bench (stepfun-ai/GEdit-Bench on the Hugging Face hub): a parquet dataset, split "train", columns
# task_type, key, instruction, instruction_language, input_image, input_image_raw, Intersection_exist.
GEDIT_ROWS = [
    ("background_change", "a1b2", "Change the background to a beach", "en", True),
    ("color_alter", "c3d4", "Make the cat blue", "en", False),
    ("color_alter", "c3d4", "把猫变成蓝色", "cn", False),
]


def gedit_dataset(directory: Path) -> Path:
    """A local copy laid out as `hf download --repo-type dataset stepfun-ai/GEdit-Bench` leaves it."""
    import datasets

    photos = photo_files(directory / "photos", [f"{i}.png" for i in range(len(GEDIT_ROWS))], side=48)
    features = datasets.Features(
        {
            "task_type": datasets.Value("string"),
            "key": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "instruction_language": datasets.Value("string"),
            "input_image": datasets.Image(),
            "input_image_raw": datasets.Image(),
            "Intersection_exist": datasets.Value("bool"),
        }
    )
    rows = {name: [] for name in features}
    for (task, key, instruction, language, intersection), photo in zip(GEDIT_ROWS, photos, strict=True):
        image = Image.open(photo).convert("RGB")
        for name, value in zip(
            features,
            (task, key, instruction, language, image.resize((32, 32)), image, intersection),
            strict=True,
        ):
            rows[name].append(value)
    folder = directory / "GEdit-Bench"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet")
    )
    return folder


def image_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def fake_scorer(root: Path, files: dict[str, str]) -> str:
    """A stand-in for an official scorer checkout: a git repository holding `files` (path -> Python source)."""
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "scorer"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
