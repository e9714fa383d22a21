"""Shards streamed from object storage with `pipe:` urls, as docs/data.md shows: `pipe:aws s3 cp s3://... -`
and `pipe:gsutil cat gs://...`, through training's data loader. The stand-ins for the two clients are small
scripts on PATH that `cat` the object from a local folder playing the bucket, with the clients' own exit
status on a missing object (non-zero, nothing on stdout)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests import prepare_miniatures as mini
from unilip.data import DataError, ShardDataModule
from unilip.data.index import read_index
from unilip.data.prepare.datasets import prepare

AWS = """#!/bin/sh
# stand-in for `aws s3 cp s3://<bucket>/<key> -`: objects are files under $FAKE_BUCKETS
[ "$1" = s3 ] && [ "$2" = cp ] && [ "$4" = - ] || { echo "usage: aws s3 cp s3://bucket/key -" >&2; exit 2; }
exec cat "$FAKE_BUCKETS/${3#s3://}"
"""
GSUTIL = """#!/bin/sh
# stand-in for `gsutil cat gs://<bucket>/<key>`
[ "$1" = cat ] || exit 2
exec cat "$FAKE_BUCKETS/${2#gs://}"
"""


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """Edit shards prepared into `<buckets>/training-data/sharegpt4o/edit/`, and the two clients on PATH."""
    if shutil.which("sh") is None:
        pytest.skip("needs a POSIX shell for the stand-in clients")
    _, edit = mini.sharegpt4o_download(tmp_path / "dl", records=5)
    buckets = tmp_path / "buckets"
    prepare("sharegpt4o-edit", tmp_path / "dl", buckets / "training-data" / "sharegpt4o" / "edit", samples_per_shard=2)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("aws", AWS), ("gsutil", GSUTIL)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BUCKETS", str(buckets))
    return buckets, edit


S3 = "pipe:aws s3 cp s3://training-data/sharegpt4o/edit/shard-{000000..000002}.tar -"
GS = "pipe:gsutil cat gs://training-data/sharegpt4o/edit/shard-{000000..000002}.tar"


def test_evaluation_reads_every_streamed_sample_once(bucket):
    _, edit = bucket
    data = ShardDataModule(val_urls=GS, image_size=32, batch_size=4, num_workers=2, with_source=True, pin_memory=False)
    data.setup("validate")
    batches = list(data.val_dataloader())
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert captions == {k: s["instruction.txt"].decode() for k, s in edit.samples.items()}
    assert sum(len(b["key"]) for b in batches) == 5 and data.skipped["val/shards"] == 0


def test_training_streams_from_s3_with_the_count_of_the_index(bucket):
    buckets, edit = bucket
    total = sum(read_index(buckets / "training-data" / "sharegpt4o" / "edit").values())
    source = {"name": "sharegpt4o_edit", "urls": S3, "repeat": 3, "samples": total}
    data = ShardDataModule(
        train_sources=[source], image_size=32, batch_size=4, train_batches_per_epoch=3, num_workers=1, with_source=True
    )
    data.setup("fit")
    assert data.epoch_samples() == (3 * 5, {"sharegpt4o_edit": (3, 5)})
    batches = list(data.train_dataloader())
    assert len(batches) == 3 and all(b["has_source"].all() for b in batches)
    expected = {k: s["instruction.txt"].decode() for k, s in edit.samples.items()}
    for batch in batches:
        for key, caption in zip(batch["key"], batch["caption"], strict=True):
            assert expected[key] == caption
    assert data.skipped["train/shards"] == 0


def test_a_streamed_shard_that_is_not_there_is_skipped_and_counted(bucket):
    buckets, _ = bucket
    (buckets / "training-data" / "sharegpt4o" / "edit" / "shard-000001.tar").unlink()  # 2 of the 5 samples
    data = ShardDataModule(val_urls=S3, image_size=32, batch_size=8, num_workers=0, with_source=True)
    data.setup("validate")
    (batch,) = list(data.val_dataloader())
    assert sorted(batch["key"]) == ["00000000", "00000001", "00000004"]
    assert data.skipped["val/shards"] == 1


def test_repeat_without_a_count_names_the_fix_for_streamed_shards(bucket):
    data = ShardDataModule(train_sources=[{"name": "edits", "urls": S3, "repeat": 3}], num_workers=0)
    with pytest.raises(DataError, match=r"streamed shards: give the source's `samples`"):
        data.setup("fit")


def test_samples_must_be_a_positive_count():
    with pytest.raises(ValueError, match=r"samples=0: must be a positive integer"):
        ShardDataModule(train_sources=[{"name": "edits", "urls": S3, "repeat": 3, "samples": 0}])


def test_the_stand_in_fails_like_the_client_on_a_missing_object(bucket):
    result = subprocess.run(["aws", "s3", "cp", "s3://training-data/nothing.tar", "-"], capture_output=True)
    assert result.returncode != 0 and result.stdout == b""
