"""Generation data as the reference trains on it: each stage's own mix, whole images (no crop, no flip),
stages in data epochs counted from the shards' index."""

from __future__ import annotations

import io
import logging
import math
import random
import tarfile

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose_train
from unilip.data import DataError, ShardDataModule, write_shards
from unilip.data.index import count_samples, read_index
from unilip.data.index import main as index_main
from unilip.data.make_shards import folder_records
from unilip.data.transforms import SampleTransform
from unilip.models.presets import CONF_DIR
from unilip.tasks.generation.setup import check_generation_config
from unilip.training.config import ConfigError
from unilip.training.epochs import plan_steps

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment" / "generate").glob("*.yaml"))


def _composed(experiment: str, stage: int, *extra: str):
    cfg = compose_train([f"experiment=generate/{experiment}", f"stage={stage}", "run_dir=/tmp/x", *extra])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_stage1_data_has_no_edit_source_and_stage3_is_never_the_stage2_mix(experiment):
    stages = {stage: _composed(experiment, stage).data.train_sources for stage in (1, 2, 3)}
    edit_urls = {s.urls for s in stages[2]} - {s.urls for s in stages[1]}
    assert edit_urls and all("edit" in urls for urls in edit_urls)  # stage 2 adds the edit data
    assert not any("edit" in s.name or "edit" in s.urls for s in stages[1])  # stage 1: text-to-image only
    mix = lambda sources: {(s.name, s.urls, s.get("weight"), s.get("repeat")) for s in sources}  # noqa: E731
    assert mix(stages[3]) != mix(stages[2])
    if experiment != "quickstart":  # the reference's SFT: BLIP3o-60k x1 + ShareGPT-4o-Image (t2i x1, edits x3)
        assert [(s.name, s.repeat) for s in stages[3]] == [
            ("blip3o_60k", 1),
            ("sharegpt4o_t2i", 1),
            ("sharegpt4o_edit", 3),
        ]
        assert [s.repeat for s in stages[2]] == [1, 1, 1, 10]  # GPT-Image-Edit x10 beside BLIP3o-Pretrain


def test_stage1_batches_of_the_quickstart_never_carry_a_source(photos_dir):
    cfg = _composed("quickstart", 1, f"paths.data_dir={photos_dir}", "data.num_workers=0", "data.batch_size=16")
    data: ShardDataModule = instantiate(cfg.data)
    batches = iter(data.train_dataloader())
    assert not any(next(batches)["has_source"].any() for _ in range(6))  # 96 samples, none an edit
    cfg2 = _composed("quickstart", 2, f"paths.data_dir={photos_dir}", "data.num_workers=0", "data.batch_size=16")
    batches = iter(instantiate(cfg2.data).train_dataloader())
    assert any(next(batches)["has_source"].any() for _ in range(6))  # the same reader sees edits in stage 2


def test_stage3_without_an_sft_mix_is_an_error():
    cfg = compose_train(["experiment=generate/quickstart", "stage=3", "data=photos", "run_dir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"stage 3 \(SFT\) needs its own data"):
        check_generation_config(cfg)
    check_generation_config(compose_train(["experiment=generate/unilip_1b", "stage=3", "run_dir=/tmp/x"]))


def _arrow(width: int = 120, height: int = 70) -> Image.Image:
    """A non-square picture whose left and right differ and whose corners are marked."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 3] = (220, 30, 30)  # red on the left
    pixels[:, -width // 3 :] = (30, 30, 220)  # blue on the right
    pixels[:8, :8] = (250, 250, 0)  # yellow top-left corner
    pixels[-8:, -8:] = (0, 250, 0)  # green bottom-right corner
    return Image.fromarray(pixels)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_generation_transforms_never_flip_or_crop(experiment):
    cfg = _composed(experiment, 2)
    transform = SampleTransform(
        56, train=True, random_flip=cfg.data.random_flip, with_source=True, resize=cfg.data.resize
    )
    image = _arrow()
    expected = np.asarray(image.resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float32)  # the whole image
    edit = {"__key__": "e", "target.png": _png(image), "source.png": _png(image), "instruction.txt": b"make it red"}
    caption = {"__key__": "c", "png": _png(image), "txt": b"red on the left of blue"}
    for raw in (edit, caption):
        for seed in range(16):  # shorter-edge crops and flips would crop and flip with these seeds (below)
            out = transform(dict(raw), random.Random(seed))
            for key in ("image", "source") if "source" in out and out["source"] is not None else ("image",):
                assert np.abs(out[key].astype(np.float32) - expected).max() <= 1
            assert out["image"][28, 2, 0] > 150 and out["image"][28, 53, 2] > 150  # red stays left, blue right
    cropping = SampleTransform(56, train=True, random_flip=True, flip_edits=True, with_source=True)
    outputs = [cropping(dict(caption), random.Random(seed))["image"] for seed in range(16)]
    assert any(np.abs(o.astype(np.float32) - expected).max() > 50 for o in outputs)  # the tokenizer's crops differ


def _write_tar(path, samples: dict[str, list[str]]) -> None:
    """A shard as another tool writes it: members `<key>.<ext>`, some samples with several members."""
    with tarfile.open(path, "w") as tar:
        for key, exts in samples.items():
            for ext in exts:
                data = b"x" * 10
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_the_shard_index_counts_samples_as_the_loader_groups_them(tmp_path):
    shard_dir = tmp_path / "downloaded"
    shard_dir.mkdir()
    _write_tar(
        shard_dir / "a.tar",
        {"0001": ["jpg", "txt"], "0002": ["jpg"], "0003": ["source.jpg", "target.jpg", "instruction.txt"]},
    )
    _write_tar(shard_dir / "b.tar", {f"{i:04d}": ["png", "json"] for i in range(5)})
    assert count_samples(shard_dir / "a.tar") == 3
    assert index_main([str(shard_dir)]) == 0
    assert read_index(shard_dir) == {"a.tar": 3, "b.tar": 5}
    # the shard maker writes the index itself, with what it wrote
    source = tmp_path / "images"
    source.mkdir()
    for i in range(7):
        Image.new("RGB", (40, 30), (i * 30, 0, 0)).save(source / f"{i}.png")
    report = write_shards(folder_records(source), tmp_path / "made", prefix="train", samples_per_shard=3)
    assert read_index(tmp_path / "made") == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    assert report.written == 7


def test_stages_in_epochs_become_steps_from_the_counts(tmp_path, caplog):
    for name, count in (("t2i", 40), ("edit", 7)):
        (tmp_path / name).mkdir()
        _write_tar(tmp_path / name / "s.tar", {f"{i:04d}": ["jpg", "txt"] for i in range(count)})
        index_main([str(tmp_path / name)])
    sources = [
        f"stage_sources.stage2=[{{name: t2i, urls: '{tmp_path}/t2i/*.tar', repeat: 1}}, "
        f"{{name: edit, urls: '{tmp_path}/edit/*.tar', repeat: 10}}]"
    ]
    devices = ["trainer.devices=4", "trainer.accelerator=cpu", "data.batch_size=3", "data.val_urls=null"]
    cfg = compose_train(["experiment=generate/unilip_1b", "stage=2", "run_dir=/tmp/x", *sources, *devices])
    data = instantiate(cfg.data)
    caplog.set_level(logging.INFO, logger="unilip.training.epochs")
    steps = plan_steps(cfg, data)
    assert steps == math.ceil(5 * (40 + 10 * 7) / (3 * 4)) == cfg.trainer.max_steps  # 5 epochs of 110, batch 12
    assert (
        "110 samples per epoch" in caplog.text
        and "global batch 12" in caplog.text
        and f"-> {steps} steps" in caplog.text
    )
    data.setup(rank=0, world_size=1)
    assert {s.name: s.weight for s in data._sources} == {"t2i": 40, "edit": 70}  # repeat x count: the reference's mix

    (tmp_path / "edit" / "index.json").unlink()
    with pytest.raises(ConfigError, match=r"needs every data source to give `repeat` and a sample count; \['edit'\]"):
        plan_steps(cfg, instantiate(cfg.data))
    with pytest.raises(DataError, match=r"train_sources\[edit\] gives repeat=10.*python -m unilip.data.index"):
        instantiate(cfg.data).setup(rank=0, world_size=1)
    both = compose_train(
        ["experiment=generate/unilip_1b", "stage=2", "run_dir=/tmp/x", "stages.stage2.max_steps=9", *sources]
    )
    with pytest.raises(ConfigError, match=r"give either epochs .* or max_steps, not both"):
        plan_steps(both, instantiate(both.data))
