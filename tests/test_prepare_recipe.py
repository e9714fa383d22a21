"""From the downloads to training, as docs/data.md tells a user: miniatures of the generation recipe's six
downloads -> `prepare` into the folders docs/data.md names -> the recipe's data preset
(`data=blip3o_generation`) unchanged, at toy size (the generation quick start's tiny models) -> stage 1
(its step count from the prepared shards' index.json) and stage 2 (BLIP3o-Pretrain + the edits x10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import prepare_miniatures as mini
from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.data.prepare.datasets import prepare
from unilip.training.run import train

# docs/data.md's commands: (dataset, download folder, out folder under the data directory)
COMMANDS = [
    ("blip3o-pretrain", "BLIP3o-Pretrain-Short-Caption", "blip3o/short_caption"),
    ("blip3o-pretrain", "BLIP3o-Pretrain-Long-Caption", "blip3o/long_caption"),
    ("journeydb", "BLIP3o-Pretrain-JourneyDB", "blip3o/journeydb"),
    ("gpt-image-edit", "GPT-Image-Edit-1.5M", "gpt_image_edit"),
    ("blip3o-60k", "BLIP3o-60k", "blip3o_60k"),
    ("sharegpt4o-t2i", "ShareGPT-4o-Image", "sharegpt4o/t2i"),
    ("sharegpt4o-edit", "ShareGPT-4o-Image", "sharegpt4o/edit"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("recipe")
    downloads, data = root / "downloads", root / "data"
    for seed, folder in enumerate(
        ["BLIP3o-Pretrain-Short-Caption", "BLIP3o-Pretrain-Long-Caption", "BLIP3o-Pretrain-JourneyDB"]
    ):
        mini.blip3o_download(downloads / folder, shards=2, seed=10 * seed)  # 5 good samples each
    mini.blip3o_download(downloads / "BLIP3o-60k", shards=1, seed=40)
    mini.gpt_image_edit_download(downloads / "GPT-Image-Edit-1.5M", records=3)  # 6 single-turn edits
    mini.sharegpt4o_download(downloads / "ShareGPT-4o-Image")
    for dataset, download, out in COMMANDS:
        prepare(dataset, downloads / download, data / out)
    (data / "photos").symlink_to(photos_dir / "photos")  # validation: the bundled photos, as the preset says
    return data


def _cfg(data_dir: Path, runs: Path, stage: int, tokenizer_dir, *extra: str):
    return compose_train(
        [
            "experiment=generate/quickstart",
            "data=blip3o_generation",  # the recipe's preset, paths unchanged
            f"paths.data_dir={data_dir}",
            f"paths.runs_dir={runs}",
            f"run_dir={runs / 'recipe' / 'generate' / f'stage{stage}'}",
            f"stage={stage}",
            f"tokenizer_from={tokenizer_dir}",
            "name=recipe",
            "data.num_workers=0",
            "data.val_num_workers=0",
            "data.pin_memory=false",
            "trainer.enable_progress_bar=false",
            "trainer.num_sanity_val_steps=0",
            "module.sample_steps=2",
            *extra,
        ]
    )


def test_prepared_downloads_train_stage_1_and_2_with_the_recipe_preset(data_dir, tmp_path, tokenizer_dir):
    runs = tmp_path / "runs"
    # stage 1: one data epoch of BLIP3o-Pretrain (3 x 5 counted samples, batch 8) -> 2 steps
    cfg = _cfg(data_dir, runs, 1, tokenizer_dir, "+stages.stage1.epochs=1", "stages.stage1.max_steps=null")
    stage1 = train(cfg)
    assert cfg.trainer.max_steps == 2
    assert _global_step(stage1) == 2
    # stage 2 (starts from stage 1): BLIP3o-Pretrain x1 + GPT-Image-Edit x10, edits with their sources
    cfg = _cfg(data_dir, runs, 2, tokenizer_dir, "stages.stage2.max_steps=2")
    stage2 = train(cfg)
    assert _global_step(stage2) == 2
    data = _datamodule(cfg)
    sources = {s.name: s for s in data._sources}
    assert sources["gpt_image_edit"].weight == 10 * 6 and sources["short_caption"].weight == 5
    batch = next(iter(data.train_dataloader()))  # what stage 2 trains on: edits with their source images
    pairs = list(zip(batch["caption"], batch["has_source"].tolist(), strict=True))
    assert any(has for _, has in pairs)
    assert all(c.startswith("Make the sky ") and c.endswith("and keep the  rest.") for c, has in pairs if has)
    assert all(c.startswith("A photo, number") for c, has in pairs if not has)


def _datamodule(cfg):
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.setup()
    return data


def _global_step(run_dir: Path) -> int:
    (checkpoint,) = (run_dir / "checkpoints").glob("last*.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
