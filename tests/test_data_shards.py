"""Shards in: the shard maker's round trips, the bundled photo set, and the data configs users compose."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image, ImageOps

from unilip.data import PHOTOS, DataError, ShardDataModule, build_photo_shards, write_shards
from unilip.data.make_shards import folder_records, main
from unilip.data.samples import EDITS, VAL_PHOTOS

CONF = Path(__file__).resolve().parents[1] / "conf"


def save_photo(path: Path, seed: int, size=(48, 36), fmt: str = "JPEG") -> Path:
    """A smooth random image (so JPEG keeps it close), written in `fmt`."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(path, fmt)
    return path


def eval_batches(urls, **kw) -> list[dict]:
    dm = ShardDataModule(val_urls=urls, image_size=kw.pop("image_size", 32), num_workers=0, **kw)
    return list(dm.val_dataloader())


def test_folder_to_shards_yields_every_image_once_with_its_caption(tmp_path):
    root = tmp_path / "folder"
    expected = {}  # key -> caption
    for i in range(7):
        sub = "sub" if i % 2 else ""
        path = save_photo(root / sub / f"img.{i}.jpg", i)
        if i != 3:  # one image without a caption
            path.with_suffix(".txt").write_text(f"photo number {i}\n")
        expected[f"{sub}_img_{i}".lstrip("_")] = f"photo number {i}" if i != 3 else ""
    save_photo(root / "extra.png", 10, fmt="PNG")
    expected["extra"] = ""
    (root / "broken.jpg").write_bytes(save_photo(tmp_path / "x.jpg", 0).read_bytes()[:200])  # truncated file
    report = write_shards(folder_records(root), tmp_path / "shards", prefix="f", samples_per_shard=3)
    assert report.written == 8 and len(report.bad) == 1 and "broken.jpg" in report.bad[0]
    assert [Path(s).name for s in report.shards] == ["f-000000.tar", "f-000001.tar", "f-000002.tar"]

    batches = eval_batches(str(tmp_path / "shards" / "f-*.tar"), batch_size=4)
    got = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert sum(len(b["key"]) for b in batches) == len(got) == 8
    assert got == expected


def test_original_bytes_are_kept_unless_a_resize_is_asked(tmp_path):
    jpg = save_photo(tmp_path / "in" / "a.jpg", 1, size=(80, 60))
    save_photo(tmp_path / "in" / "b.bmp", 2, size=(80, 60), fmt="BMP")
    write_shards(folder_records(tmp_path / "in"), tmp_path / "keep", prefix="k")
    with tarfile.open(tmp_path / "keep" / "k-000000.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile("a.jpg").read() == jpg.read_bytes()  # no re-encoding
    assert names == ["a.jpg", "b.png"]  # BMP is not read by the loader: stored as lossless PNG
    write_shards(folder_records(tmp_path / "in"), tmp_path / "small", prefix="s", max_size=40)
    with tarfile.open(tmp_path / "small" / "s-000000.tar") as tar:
        assert Image.open(io.BytesIO(tar.extractfile("a.jpg").read())).size == (53, 40)  # shorter side 60 -> 40


def test_class_folders_write_label_and_class_name(tmp_path):
    for c, name in enumerate(["n01_tench", "n02_goldfish"]):
        for i in range(2):
            save_photo(tmp_path / "classes" / name / f"{i}.JPEG", 10 * c + i)
    main([str(tmp_path / "classes"), str(tmp_path / "out"), "--prefix", "val"])  # the console script
    with tarfile.open(tmp_path / "out" / "val-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert members["n02_goldfish_1.cls"] == b"1"
    assert json.loads(members["n02_goldfish_1.json"]) == {"label": 1, "class_name": "n02_goldfish"}
    assert len(eval_batches(str(tmp_path / "out" / "val-000000.tar"), batch_size=8)[0]["key"]) == 4


def test_jsonl_edit_records_become_source_target_instruction_batches(tmp_path):
    lines = []
    for i in range(5):
        source = save_photo(tmp_path / "edits" / f"src{i}.png", i, size=(40, 40), fmt="PNG")
        ImageOps.mirror(Image.open(source)).save(tmp_path / "edits" / f"tgt{i}.png")
        lines.append(
            json.dumps({"source": f"edits/src{i}.png", "instruction": f"mirror {i}", "target": f"edits/tgt{i}.png"})
        )
    save_photo(tmp_path / "edits" / "plain.png", 9, fmt="PNG")
    lines.append(json.dumps({"image": "edits/plain.png", "caption": "a plain picture"}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    main([str(tmp_path / "records.jsonl"), str(tmp_path / "out"), "--prefix", "edit"])

    (batch,) = eval_batches(str(tmp_path / "out" / "edit-000000.tar"), batch_size=8, with_source=True)
    assert batch["has_source"].tolist() == [True] * 5 + [False]
    assert batch["caption"] == [f"mirror {i}" for i in range(5)] + ["a plain picture"]
    assert torch.equal(batch["source_image"][:5].flip(-1), batch["image"][:5])  # target = mirrored source
    assert not batch["source_image"][5].any()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out)
    return out


def test_photo_shards_split_by_photo_with_true_captions(photo_dir):
    manifest = json.loads((photo_dir / "manifest.json").read_text())
    assert set(manifest["photos"]["val"]) == set(VAL_PHOTOS)
    assert manifest["counts"] == {"train": 288, "edit-train": 108, "val": 12, "edit-val": 12}
    for split in ("train", "val", "edit-train", "edit-val"):
        keys = [k for b in eval_batches(str(photo_dir / f"{split}-*.tar"), batch_size=64) for k in b["key"]]
        photos = {k.split("_")[0] for k in keys}
        assert photos == set(manifest["photos"][split.removeprefix("edit-")]), split  # no photo crosses splits
        assert len(keys) == len(set(keys)) == manifest["counts"][split]
    (batch,) = eval_batches(str(photo_dir / "val-*.tar"), batch_size=64)
    assert all(
        caption == PHOTOS[key.split("_")[0]][1] for key, caption in zip(batch["key"], batch["caption"], strict=True)
    )
    (edits,) = eval_batches(str(photo_dir / "edit-val-*.tar"), batch_size=64, with_source=True)
    assert edits["has_source"].all() and set(edits["caption"]) == {instruction for instruction, _ in EDITS.values()}


def test_photo_shards_are_reproducible(photo_dir, tmp_path):
    build_photo_shards(tmp_path)
    assert (tmp_path / "train-000000.tar").read_bytes() == (photo_dir / "train-000000.tar").read_bytes()


def _compose(name: str, data_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+data={name}", f"+paths.data_dir={data_dir}", *overrides])
    return cfg.data


def test_photos_config_builds_its_shards_and_trains(photo_dir, tmp_path):
    (tmp_path / "photos").symlink_to(photo_dir)  # prepare_data finds the manifest: no rebuild
    small = ["data.image_size=32", "data.batch_size=4", "data.num_workers=0", "data.val_num_workers=0"]
    dm: ShardDataModule = instantiate(_compose("photos_edit", tmp_path, "+_stage_name=stage2", *small))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["source_image"].shape == (4, 3, 32, 32)
    assert len(dm.train_dataloader()) == 1000
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(val_keys) == 24 and dm.skipped == dict.fromkeys(
        ["train/samples", "train/shards", "val/samples", "val/shards"], 0
    )


def test_prepare_data_builds_missing_photos(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("unilip.data.samples.build_photo_shards", lambda out: built.append(out))
    instantiate(_compose("photos", tmp_path)).prepare_data()
    assert built == [f"{tmp_path}/photos"]


def test_blip3o_config_mixes_three_sources_and_names_a_missing_one(tmp_path):
    cfg = _compose("blip3o", tmp_path, "data.build_photos=false")
    assert [(s.name, s.weight) for s in cfg.train_sources] == [
        ("short_caption", 0.2),
        ("long_caption", 0.6),
        ("journeydb", 0.2),
    ]
    with pytest.raises(
        DataError, match=r"train_sources\[short_caption\]\.urls: no shard matches .*short_caption/\*\.tar"
    ):
        instantiate(cfg).setup()
    eval_only: ShardDataModule = instantiate(_compose("imagenet_val", tmp_path))
    assert eval_only.train_sources == [] and eval_only.image_size == 256


def test_loader_benchmark_writes_its_table(tmp_path, caplog):
    from unilip.data.bench import main as bench

    caplog.set_level("INFO", logger="unilip.data.bench")
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    bench(
        ["--sizes", "32", "--workers", "0", "--batches", "2", "--batch-size", "4", "--images", "8", "--json", str(out)]
    )
    assert torch.get_num_threads() == threads  # measured at one thread, the caller's setting restored
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == 32 and row["workers"] == 0 and row["images_per_s"] > 0
    assert "images/s" in caplog.text


def _copy_of(photos: Path, built: list):
    """A stand-in for `build_photo_shards` that copies a finished set (seconds faster) and counts its calls.

    Like the real build, the manifest arrives last: a waiting rank that sees it must find every shard.
    """

    def build(out_dir) -> None:
        import shutil

        from unilip.data.samples import MANIFEST

        built.append(str(out_dir))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted(photos.iterdir(), key=lambda path: path.name == MANIFEST):
            shutil.copy2(source, out_dir / source.name)

    return build


def test_other_processes_wait_for_the_photos_local_rank_0_builds(photo_dir, tmp_path, monkeypatch):
    """torchrun and srun start every rank at once: a rank that is not local rank 0 waits for the manifest
    (moved in last) and then finds the whole set; with nobody building, it stops with one clear error."""
    import threading

    from unilip.data.samples import ensure_photo_shards
    from unilip.data.shards import expand_urls

    out = tmp_path / "data" / "photos"
    with pytest.raises(DataError, match="waited 0 s for local rank 0 to build the bundled photo shards"):
        ensure_photo_shards(out, builder=False, timeout_s=0.2, poll_s=0.05)
    seen: list = []

    def other_rank() -> None:
        ensure_photo_shards(out, builder=False, timeout_s=60, poll_s=0.05)
        seen.append(sorted(Path(url).name for url in expand_urls(str(out / "*.tar"))))

    waiter = threading.Thread(target=other_rank)
    waiter.start()
    built: list = []
    monkeypatch.setattr("unilip.data.samples.build_photo_shards", _copy_of(photo_dir, built))
    ensure_photo_shards(out, builder=True)
    ensure_photo_shards(out, builder=True)  # there now: not built again
    waiter.join(timeout=60)
    assert built == [str(out)]
    assert seen == [sorted(p.name for p in photo_dir.glob("*.tar"))]


def test_a_build_appears_whole_and_replaces_what_an_interrupted_one_left(tmp_path, monkeypatch):
    """The set is written beside the target and moved in, manifest last: a half-written shard is never in
    data/photos, a stale shard of an earlier build is removed, and a killed build's folder is cleaned up."""
    out = tmp_path / "photos"
    out.mkdir()
    (out / "train-000009.tar").write_bytes(b"left by an interrupted build")
    abandoned = tmp_path / f".photos.building-{__import__('socket').gethostname()}-999999999"
    abandoned.mkdir()
    moves = []
    real_replace = __import__("os").replace

    def replace(source, target) -> None:
        moves.append((Path(source).parent.name, Path(target).name, (out / "manifest.json").exists()))
        real_replace(source, target)

    monkeypatch.setattr("unilip.data.samples.os.replace", replace)
    manifest = build_photo_shards(out, crops_per_photo=2, val_crops_per_photo=1, edit_crops_per_photo=1)
    assert not (out / "train-000009.tar").exists() and not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no building folder left
    assert moves[-1][1] == "manifest.json" and not any(done for _, _, done in moves)  # the manifest comes last
    assert all(folder.startswith(".photos.building-") for folder, _, _ in moves)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "edit-train-000000.tar", "edit-val-000000.tar", "train-000000.tar", "val-000000.tar"
    ]  # fmt: skip
