"""`python -m unilip.data.prepare` on a miniature of each dataset's download as published (the layouts and
where each fact comes from: tests/prepare_miniatures.py), checked sample by sample: the image bytes,
the caption or instruction, the edit pairing, the counts in index.json, and every skipped or left-out
item named in the report. Also: the loader reads the UniLIP authors' converted edit shards as edits."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import prepare_miniatures as mini
from unilip.data import ShardDataModule
from unilip.data.index import read_index
from unilip.data.prepare.datasets import prepare
from unilip.data.shards import SkipCounter, read_shard


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every `*.tar` in `out`, key -> {member: bytes}, in file order."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        for raw in read_shard(str(shard), SkipCounter(verbose=False)):
            key = raw.pop("__key__")
            raw.pop("__url__")
            assert key not in samples, f"{key} twice"
            samples[key] = raw
    return samples


def check(out: Path, report: dict, expected: mini.Expected) -> None:
    got = shard_samples(out)
    assert got == (expected.samples if expected.in_shards is None else expected.in_shards)  # every member's bytes
    index = read_index(out)
    assert index == report["shards"] and sum(index.values()) == report["samples"] == len(expected.samples)
    assert index.keys() == {p.name for p in out.glob("*.tar")}
    assert len(report["skipped"]) == len(expected.skipped)
    for fragment, line in zip(expected.skipped, report["skipped"], strict=True):
        assert fragment in line, (fragment, line)
    for fragment, line in zip(expected.not_selected, report["not_selected_items"], strict=True):
        assert line.startswith(fragment.split(": ")[0]) and fragment.split(": ")[1] in line, (fragment, line)
    assert len(report["not_selected_items"]) == len(expected.not_selected)
    on_disk = json.loads(next(out.glob("*-report.json")).read_text())
    assert on_disk == report
    assert not list(out.glob("*.tmp"))


def test_gpt_image_edit_single_turn_edits_with_the_authors_cleaning(tmp_path):
    expected = mini.gpt_image_edit_download(tmp_path / "GPT-Image-Edit-1.5M")
    report = prepare("gpt-image-edit", tmp_path / "GPT-Image-Edit-1.5M", tmp_path / "out", samples_per_shard=3)
    check(tmp_path / "out", report, expected)
    assert list(shard_samples(tmp_path / "out")) == sorted(expected.samples)  # numbered in the lists' order
    assert [p.name for p in sorted((tmp_path / "out").glob("*.tar"))] == [f"shard-00000{i}.tar" for i in range(4)]
    first = shard_samples(tmp_path / "out")["00000000"]["instruction.txt"].decode()
    assert first == "Make the sky pinkand keep the  rest."  # the authors' cleaning, to the character
    assert report["not_selected"] == {
        "not a single-turn edit (1 image(s); an edit has 2)": 1,
        "not a single-turn edit (3 image(s); an edit has 2)": 1,
    }


def test_gpt_image_edit_list_may_be_named_data_txt_and_runs_on_two_processes(tmp_path):
    expected = mini.gpt_image_edit_download(tmp_path / "dl", list_name="data.txt")
    report = prepare("gpt-image-edit", tmp_path / "dl", tmp_path / "out", workers=2, samples_per_shard=2)
    check(tmp_path / "out", report, expected)


@pytest.mark.parametrize("packed", [True, False], ids=["images-in-archives", "unpacked"])
def test_sharegpt4o_text_to_image_and_edits(tmp_path, packed):
    t2i, edit = mini.sharegpt4o_download(tmp_path / "ShareGPT-4o-Image", packed=packed)
    check(tmp_path / "t2i", prepare("sharegpt4o-t2i", tmp_path / "ShareGPT-4o-Image", tmp_path / "t2i"), t2i)
    check(tmp_path / "edit", prepare("sharegpt4o-edit", tmp_path / "ShareGPT-4o-Image", tmp_path / "edit"), edit)


def test_sharegpt4o_names_an_image_found_nowhere(tmp_path):
    t2i, _ = mini.sharegpt4o_download(tmp_path / "dl", packed=False)
    (tmp_path / "dl" / "text_to_image" / "00002.png").unlink()
    del t2i.samples["00000002"]
    t2i.skipped.append("text_to_image/00002.png: no such file")
    check(tmp_path / "out", prepare("sharegpt4o-t2i", tmp_path / "dl", tmp_path / "out"), t2i)


@pytest.mark.parametrize(
    "layout", [mini.imagenet_hub_download, mini.imagenet_official_download, mini.imagenet_class_folders]
)
def test_imagenet_validation_from_each_download(tmp_path, layout):
    expected = layout(tmp_path / "imagenet")
    report = prepare("imagenet", tmp_path / "imagenet", tmp_path / "imagenet_val", samples_per_shard=3)
    check(tmp_path / "imagenet_val", report, expected)
    assert sorted(p.name for p in (tmp_path / "imagenet_val").glob("*.tar")) == [f"val-00000{i}.tar" for i in range(3)]


@pytest.mark.parametrize("dataset", ["blip3o-pretrain", "journeydb", "blip3o-60k"])
def test_webdataset_downloads_are_verified_and_linked_not_copied(tmp_path, dataset):
    download = tmp_path / "download"
    expected = mini.blip3o_download(download)
    before = {p.name: p.read_bytes() for p in download.iterdir()}
    report = prepare(dataset, download, tmp_path / "out", workers=2)
    out = tmp_path / "out"
    check(out, report, expected)
    links = sorted(out.glob("*.tar"))
    assert [p.name for p in links] == ["00000.tar", "00001.tar", "00002.tar"]  # the broken 00003.tar is left out
    assert all(p.is_symlink() and p.resolve() == (download / p.name).resolve() for p in links)
    assert read_index(out) == {"00000.tar": 3, "00001.tar": 2, "00002.tar": 3}  # the good samples
    assert {p.name: p.read_bytes() for p in download.iterdir()} == before  # the download is untouched
    assert "(not linked)" in report["skipped"][-1]


def test_a_repaired_shard_is_linked_when_the_command_runs_again(tmp_path):
    download = tmp_path / "download"
    mini.blip3o_download(download, shards=2)
    prepare("blip3o-60k", download, tmp_path / "out")
    assert not (tmp_path / "out" / "00002.tar").exists()
    mini.tar_of(download / "00002.tar", {"y.jpg": mini.image_bytes(5, fmt="JPEG"), "y.txt": b"downloaded again"})
    report = prepare("blip3o-60k", download, tmp_path / "out")
    assert (tmp_path / "out" / "00002.tar").is_symlink() and report["shards"]["00002.tar"] == 1
    assert read_index(tmp_path / "out")["00002.tar"] == 1


def test_prepared_shards_feed_the_loader_as_edits_and_captions(tmp_path):
    _, edit = mini.sharegpt4o_download(tmp_path / "dl")
    prepare("sharegpt4o-edit", tmp_path / "dl", tmp_path / "edit")
    batch = _one_batch(str(tmp_path / "edit" / "*.tar"))
    assert batch["caption"] == [s["instruction.txt"].decode() for s in edit.samples.values()]
    assert batch["has_source"].all()
    for i, sample in enumerate(edit.samples.values()):  # 40 x 30 -> square 40: pixels of the right images
        assert _close(batch["source_image"][i], sample["source.png"]) and _close(
            batch["image"][i], sample["target.png"]
        )


def test_the_authors_converted_edit_shards_are_read_as_edits(tmp_path):
    """nnnth/UniLIP `data/convert_gpt_edit.py` writes {"__key__": f"{i:08d}", "input.jpg", "output.jpg", "txt"}."""
    pairs = [(mini.image_bytes(10 + i, fmt="JPEG"), mini.image_bytes(20 + i, fmt="JPEG")) for i in range(3)]
    members = {}
    for i, (source, target) in enumerate(pairs):
        members |= {f"{i:08d}.input.jpg": source, f"{i:08d}.output.jpg": target, f"{i:08d}.txt": f"edit {i}".encode()}
    mini.tar_of(tmp_path / "GPT-Edit" / "000000.tar", members)
    batch = _one_batch(str(tmp_path / "GPT-Edit" / "*.tar"))
    assert batch["key"] == ["00000000", "00000001", "00000002"]
    assert batch["caption"] == ["edit 0", "edit 1", "edit 2"] and batch["has_source"].all()
    for i, (source, target) in enumerate(pairs):
        assert _close(batch["source_image"][i], source) and _close(batch["image"][i], target)
        assert not _close(batch["source_image"][i], target)


def _one_batch(urls: str) -> dict:
    data = ShardDataModule(
        val_urls=urls, image_size=40, batch_size=64, num_workers=0, with_source=True, resize="square"
    )
    (batch,) = list(data.val_dataloader())
    return batch


def _close(image, encoded: bytes) -> bool:
    """The loader's (3, 40, 40) uint8 image against the encoded one resized the same way by PIL directly."""
    reference = Image.open(io.BytesIO(encoded)).convert("RGB").resize((40, 40), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1)
    return (image.int() - expected.int()).abs().max().item() <= 2


def test_a_prepared_folder_is_not_prepared_twice_and_keeps_its_bytes(tmp_path):
    mini.gpt_image_edit_download(tmp_path / "dl")
    first = prepare("gpt-image-edit", tmp_path / "dl", tmp_path / "out", samples_per_shard=3)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").glob("*.tar")}
    again = prepare("gpt-image-edit", tmp_path / "dl", tmp_path / "out", samples_per_shard=3)
    assert again == first
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").glob("*.tar")} == stamps
    assert os.path.exists(tmp_path / "out" / "shard-report.json")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:  # reproducible tar headers
        assert {(m.mtime, m.uname, m.mode) for m in tar} == {(0, "bigdata", 0o444)}


def test_resuming_with_other_options_is_refused_before_anything_changes(tmp_path):
    mini.gpt_image_edit_download(tmp_path / "dl")
    prepare("gpt-image-edit", tmp_path / "dl", tmp_path / "out", samples_per_shard=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match=r"samples_per_shard: 3 there, 2 now\); give an empty folder, or the same"):
        prepare("gpt-image-edit", tmp_path / "dl", tmp_path / "out", samples_per_shard=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
