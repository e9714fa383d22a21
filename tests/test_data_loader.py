"""ShardDataModule's promises: batch contract, each eval sample once, mixing by weight, bad data
skipped and counted exactly, and a training stream that resumes bit-exactly."""

from __future__ import annotations

import io
import itertools
import random
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from unilip.data import DataError, EvalLoader, SampleTransform, ShardDataModule, TrainLoader, TrainSource, collate
from unilip.data.shards import SkipCounter, read_shard


def jpeg(seed: int, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shard(path: Path, keys: list[str], bad: tuple[str, ...] = (), size: tuple[int, int] = (40, 32)) -> Path:
    """A shard of tiny random JPEGs captioned with their key; keys in `bad` get undecodable bytes."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for key in keys:
            image = b"not an image" if key in bad else jpeg(zlib.crc32(key.encode()), size)
            writer.write({"__key__": key, "jpg": image, "txt": f"caption of {key}".encode()})
    return path


def truncate_inside(path: Path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data, like an interrupted download."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])


def shards(tmp_path: Path, count: int, per_shard: int, prefix: str = "s") -> list[str]:
    return [
        str(write_shard(tmp_path / f"{prefix}{i}.tar", [f"{prefix}{i}_{j}" for j in range(per_shard)]))
        for i in range(count)
    ]


def train_loader(urls: list[str], num_workers: int = 0, **kw) -> TrainLoader:
    options = {"batch_size": 4, "batches_per_epoch": 5, "shuffle_buffer": 8} | kw
    sources = [TrainSource("a", tuple(urls), 1.0)]
    return TrainLoader(sources, SampleTransform(24, train=True), num_workers=num_workers, **options)


def take(loader: TrainLoader, n: int) -> list[dict]:
    """The next n batches, across epoch boundaries, as a training loop would see them."""
    out: list[dict] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_batch_contract_and_input_modes(tmp_path):
    path = tmp_path / "modes.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        for key, mode in [("rgb", "RGB"), ("gray", "L"), ("cmyk", "CMYK")]:
            writer.write({"__key__": key, "jpg": jpeg(1, (50, 30), mode), "txt": f"a {key} image".encode()})
        rgba = io.BytesIO()
        Image.new("RGBA", (30, 60), (255, 0, 0, 128)).save(rgba, "PNG")
        writer.write({"__key__": "rgba", "png": rgba.getvalue(), "json": b'{"prompt": "a red square"}'})
        writer.write({"__key__": "nocap", "webp": _webp()})
    dm = ShardDataModule(val_urls=str(path), image_size=32, batch_size=8, num_workers=0)
    (batch,) = list(dm.val_dataloader())
    assert set(batch) == {"image", "caption", "key"}
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_contiguous()
    assert batch["key"] == ["rgb", "gray", "cmyk", "rgba", "nocap"]
    assert batch["caption"] == ["a rgb image", "a gray image", "a cmyk image", "a red square", ""]
    # RGBA (255, 0, 0, alpha 128) over white: 255 * (1 - 128 / 255) = 127 in green and blue
    assert batch["image"][3, :, 16, 16].tolist() == [255, 127, 127]


def _webp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 128, 255)).save(out, "WEBP")
    return out.getvalue()


def test_edit_samples_get_the_same_crop_and_flip(tmp_path):
    """Source and target are cropped and flipped together; text-to-image samples get a zero source."""
    path = tmp_path / "edit.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i in range(12):
            image = jpeg(i, (64, 40))
            writer.write({"__key__": f"e{i}", "source.jpg": image, "target.jpg": image, "instruction.txt": b"same"})
        writer.write({"__key__": "t2i", "jpg": jpeg(99), "txt": b"plain"})
    transform = SampleTransform(24, train=True, flip_edits=True, with_source=True)
    raw = list(read_shard(str(path), SkipCounter()))
    batch = collate([transform(sample, random.Random(i)) for i, sample in enumerate(raw)], with_source=True)
    edit = batch["has_source"]
    assert edit.dtype == torch.bool and edit.sum() == 12
    assert torch.equal(batch["source_image"][edit], batch["image"][edit])
    assert torch.equal(batch["source_image"][~edit], torch.zeros_like(batch["image"][~edit]))
    assert batch["caption"][int((~edit).nonzero())] == "plain" and "same" in batch["caption"]


@pytest.mark.parametrize("num_shards", [6, 1], ids=["split-by-shard", "split-by-index"])
def test_eval_sees_every_sample_once_across_ranks_and_workers(tmp_path, num_shards):
    urls = shards(tmp_path, num_shards, per_shard=18 // num_shards + 1)
    all_keys = [f"s{i}_{j}" for i in range(num_shards) for j in range(18 // num_shards + 1)]
    seen, passes = [], []
    for rank in range(2):
        dm = ShardDataModule(val_urls=urls, image_size=16, batch_size=3, num_workers=2, rank=rank, world_size=2)
        passes.append([[k for b in dm.val_dataloader() for k in b["key"]] for _ in range(2)])
        seen += passes[-1][0]
    assert sorted(seen) == sorted(all_keys)  # union is everything, with no duplicates
    assert all(first == second for first, second in passes)  # stable order, pass after pass


def test_training_streams_differ_across_ranks_and_workers(tmp_path):
    urls = shards(tmp_path, 4, per_shard=10)
    first = {}
    for rank in range(2):
        loader = train_loader(urls, num_workers=2, rank=rank, world_size=2)
        batches = take(loader, 2)  # batch 0 from worker 0, batch 1 from worker 1
        first[rank] = [b["key"] for b in batches]
    assert first[0][0] != first[0][1] and first[1][0] != first[1][1]  # workers differ
    assert first[0] != first[1]  # ranks differ


def test_mixing_follows_the_weights(tmp_path):
    """Over 3000 samples the share of each source is within 0.03 (4 standard deviations) of its weight."""
    weights = {"short": 0.2, "long": 0.6, "jdb": 0.2}
    sources = [TrainSource(n, tuple(shards(tmp_path, 2, 20, prefix=n)), w) for n, w in weights.items()]
    loader = TrainLoader(sources, SampleTransform(8, train=True), batch_size=100, batches_per_epoch=30)
    keys = [k for batch in take(loader, 30) for k in batch["key"]]
    assert len(keys) == 3000
    for name, weight in weights.items():
        assert abs(sum(k.startswith(name) for k in keys) / len(keys) - weight) < 0.03


def _bad_shards(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Good shard with one corrupt JPEG, a shard truncated inside its 5th sample, a missing shard."""
    good = write_shard(tmp_path / "good.tar", [f"g{i}" for i in range(7)], bad=("g3",))
    cut = write_shard(tmp_path / "cut.tar", [f"c{i}" for i in range(6)])
    truncate_inside(cut, "c4.jpg")
    expected = [f"g{i}" for i in range(7) if i != 3] + [f"c{i}" for i in range(4)]
    return [str(good), str(cut), str(tmp_path / "missing.tar")], expected


@pytest.mark.parametrize("ranks,workers", [(1, 0), (2, 2)])
def test_bad_data_is_skipped_and_counted_exactly(tmp_path, ranks, workers):
    urls, expected = _bad_shards(tmp_path)
    keys, skipped = [], {"samples": 0, "shards": 0}
    for rank in range(ranks):
        dm = ShardDataModule(
            val_urls=urls, image_size=16, batch_size=4, num_workers=workers, rank=rank, world_size=ranks
        )
        keys += [k for b in dm.val_dataloader() for k in b["key"]]
        skipped = {k: skipped[k] + dm.skipped[f"val/{k}"] for k in skipped}
    assert sorted(keys) == sorted(expected)
    assert skipped == {"samples": 1, "shards": 2}  # the corrupt JPEG; the truncated and the missing shard


def test_training_survives_bad_data_and_counts_every_skip(tmp_path):
    urls, _ = _bad_shards(tmp_path)
    loader = train_loader(urls, batches_per_epoch=20)
    batches = take(loader, 20)
    assert all(len(b["key"]) == 4 and "g3" not in b["key"] for b in batches)
    state = loader.state_dict()["ranks"][0]
    consumed = sum(state["positions"])
    assert loader.skipped["samples"] == consumed - 20 * 4 > 0  # every raw sample not delivered was counted
    assert loader.skipped["shards"] > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_training_data_stops_with_one_clear_error(tmp_path, workers):
    bad = write_shard(tmp_path / "bad.tar", [f"b{i}" for i in range(5)], bad=tuple(f"b{i}" for i in range(5)))
    with pytest.raises(DataError, match=r"samples in a row failed to decode \(last: b\d in .*bad.tar"):
        take(train_loader([str(bad)], num_workers=workers, max_consecutive_failures=20), 1)
    with pytest.raises(DataError, match=r"source 'a': 20 shard reads in a row gave no sample .*nothere"):
        take(train_loader([str(tmp_path / "nothere.tar")], num_workers=workers, max_consecutive_failures=20), 1)


def test_all_bad_validation_data_stops_with_one_clear_error(tmp_path):
    bad = write_shard(tmp_path / "bad.tar", ["b0", "b1"], bad=("b0", "b1"))
    loader = EvalLoader([str(bad), str(tmp_path / "gone.tar")], SampleTransform(16, train=False), batch_size=2)
    with pytest.raises(DataError, match="validation: not one sample of 2 shards could be read"):
        list(loader)


def test_empty_shard_reads_are_counted_from_the_last_read_that_gave_a_sample(tmp_path, monkeypatch):
    """max_consecutive_failures=3: a read with a sample, then empty reads; the run stops at the third empty read
    in a row (the fourth read), not earlier."""
    import unilip.data.streams as streams

    good = write_shard(tmp_path / "good.tar", ["g0"])
    sample = list(read_shard(str(good), SkipCounter()))
    reads = []

    def scripted(url, counter):
        reads.append(url)
        return iter(sample if len(reads) == 1 else [])

    monkeypatch.setattr(streams, "read_shard", scripted)
    with pytest.raises(DataError, match="'a': 3 shard reads in a row gave no sample"):
        take(train_loader([str(good)], max_consecutive_failures=3), 1)
    assert len(reads) == 4


def test_validation_stops_after_too_many_undecodable_samples_in_a_row(tmp_path):
    bad = write_shard(tmp_path / "bad.tar", [f"b{i}" for i in range(4)], bad=tuple(f"b{i}" for i in range(4)))
    loader = EvalLoader([str(bad)], SampleTransform(16, train=False), batch_size=2, max_consecutive_failures=3)
    with pytest.raises(DataError, match=r"^validation: 3 samples in a row failed to decode"):
        list(loader)


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a Lightning checkpoint would go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 8])  # mid-epoch 0; mid-epoch 1 with the worker roles rotated
def test_training_stream_resumes_exactly(tmp_path, workers, stop_after):
    urls = shards(tmp_path, 3, per_shard=9)
    write_shard(Path(urls[1]), [f"s1_{j}" for j in range(9)], bad=("s1_4",))  # a corrupt image in the stream
    more = 7  # crosses into the next epoch (5 batches per epoch)
    reference = take(train_loader(urls, workers, seed=3), stop_after + more)

    interrupted = train_loader(urls, workers, seed=3)
    take(interrupted, stop_after)
    state = _roundtrip(interrupted.state_dict())
    resumed = train_loader(urls, workers, seed=3)
    resumed.load_state_dict(state)
    continued = take(resumed, more)

    for expected, got in zip(reference[stop_after:], continued, strict=True):
        assert got["key"] == expected["key"] and got["caption"] == expected["caption"]
        assert torch.equal(got["image"], expected["image"])
    uninterrupted = train_loader(urls, workers, seed=3)
    take(uninterrupted, stop_after + more)
    assert resumed.skipped == uninterrupted.skipped and resumed.skipped["samples"] > 0
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_a_resumed_stream_does_not_count_the_skips_before_its_resume_point_again(tmp_path):
    """Unreadable shards met before the resume point (read again while the resumed stream fast-forwards) are
    reported once, as the uninterrupted stream reports them."""
    (url,) = shards(tmp_path, 1, per_shard=9)
    urls = [url, str(tmp_path / "gone.tar")]
    interrupted = train_loader(urls, seed=3)
    take(interrupted, 3)
    assert interrupted.skipped["shards"] > 0
    resumed = train_loader(urls, seed=3)
    resumed.load_state_dict(_roundtrip(interrupted.state_dict()))
    take(resumed, 1)
    uninterrupted = train_loader(urls, seed=3)
    take(uninterrupted, 4)
    assert resumed.skipped == uninterrupted.skipped


def test_resume_refuses_a_different_configuration(tmp_path):
    urls = shards(tmp_path, 1, per_shard=8)
    state = train_loader(urls, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 in the checkpoint but 2 now"):
        train_loader(urls, seed=2).load_state_dict(state)


def test_resume_on_other_hardware_continues_every_stream_that_existed(tmp_path, caplog):
    """One rank, one worker saved; resumed on two ranks (or with two workers): rank 0's stream continues exactly
    where it was (each rank and worker draws its own stream), a new rank's starts at its beginning, and every
    rank stays in step with the others (the rest of the epoch, then whole epochs)."""
    urls = shards(tmp_path, 3, per_shard=9)
    saved = train_loader(urls, seed=5)
    take(saved, 3)
    state = _roundtrip(saved.state_dict())
    expected = [b["key"] for b in take(saved, 4)]  # 2 to the end of epoch 0, 2 of epoch 1
    rank0, rank1 = train_loader(urls, seed=5, rank=0, world_size=2), train_loader(urls, seed=5, rank=1, world_size=2)
    with caplog.at_level("WARNING"):
        rank0.load_state_dict(state)
        rank1.load_state_dict(state)
    assert "the data order is not the uninterrupted run's" in caplog.text
    assert [b["key"] for b in take(rank0, 4)] == expected
    fresh = train_loader(urls, seed=5, rank=1, world_size=2)
    assert [b["key"] for b in rank1] == [b["key"] for b in take(fresh, 2)]  # the rest of epoch 0: 2 batches
    assert (rank1.epoch, rank1.delivered) == (0, 5)
    more_workers = train_loader(urls, seed=5, num_workers=2)
    more_workers.load_state_dict(state)
    assert len(list(more_workers)) == 2 and more_workers.skipped == {"samples": 0, "shards": 0}


def test_rank_and_world_size_come_from_the_trainer(tmp_path):
    urls = shards(tmp_path, 1, per_shard=4)
    dm = ShardDataModule(train_sources=[{"name": "a", "urls": urls}], val_urls=urls, image_size=16, num_workers=0)
    dm.trainer = type("FakeTrainer", (), {"global_rank": 1, "world_size": 3})()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (loader.rank, loader.world_size, len(loader)) == (1, 3, 1000)
    assert dm.train_dataloader() is loader  # asked again, the same position in the same stream
    explicit = ShardDataModule(val_urls=urls, rank=0, world_size=2, num_workers=0)
    explicit.trainer = dm.trainer
    explicit.setup("validate")
    assert (explicit.rank, explicit.world_size) == (0, 2)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data.train_sources\[0\].weight=0.0: must be > 0"):
        ShardDataModule(train_sources=[{"name": "a", "urls": "x.tar", "weight": 0}])
    with pytest.raises(ValueError, match=r"data\.image_size=0"):
        ShardDataModule(image_size=0)
    dm = ShardDataModule(train_sources=[{"name": "a", "urls": str(tmp_path / "*.tar")}])
    with pytest.raises(DataError, match=r"data.train_sources\[a\].urls: no shard matches"):
        dm.setup()


def test_shuffle_buffer_mixes_within_a_shard_without_touching_global_rngs(tmp_path):
    urls = shards(tmp_path, 1, per_shard=40)
    python_rng, torch_rng = random.getstate(), torch.get_rng_state()
    (batch,) = take(train_loader(urls, shuffle_buffer=20, batch_size=40, batches_per_epoch=1), 1)
    assert batch["key"] != sorted(batch["key"], key=lambda k: int(k.split("_")[1]))
    assert random.getstate() == python_rng and torch.equal(torch.get_rng_state(), torch_rng)
    # the buffer neither repeats nor loses a sample: the first 21 out of one 40-sample read are distinct
    assert len(set(batch["key"][:21])) == 21


def test_one_validation_sample_is_read_before_training(tmp_path):
    """A run reads validation data first at its first validation (1000 steps in the presets): unreadable validation
    data is found at start instead, by reading samples until one decodes."""
    good = write_shard(tmp_path / "good.tar", ["g0", "g1"])
    bad = write_shard(tmp_path / "bad.tar", ["b0", "b1"], bad=("b0", "b1"))
    gone = str(tmp_path / "gone.tar")
    ShardDataModule(val_urls=[gone, str(bad), str(good)], image_size=16).read_one_validation_sample()
    ShardDataModule(val_urls=None).read_one_validation_sample()  # no validation: nothing to read
    unreadable = ShardDataModule(val_urls=[gone, str(bad)], image_size=16)
    with pytest.raises(DataError, match=r"data.val_urls: no validation sample could be read from its 2 shard\(s\) "):
        unreadable.read_one_validation_sample()
    with pytest.raises(DataError, match=r"\(last: b1 in .*bad.tar: "):  # names the last sample that failed
        unreadable.read_one_validation_sample()


def test_validation_skips_are_logged_and_the_error_names_the_last_bad_sample(tmp_path, caplog):
    bad = write_shard(tmp_path / "bad.tar", ["b0", "b1"], bad=("b0", "b1"))
    loader = EvalLoader([str(tmp_path / "gone.tar"), str(bad)], SampleTransform(16, train=False), batch_size=2)
    with caplog.at_level("WARNING"), pytest.raises(DataError, match=r"\(last: b1 in .*bad.tar"):
        list(loader)
    assert "b0" in caplog.text and "b1" in caplog.text  # rank 0 names each skipped sample


def _rank_main(rank: int, init_file: str, urls: list[str], out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loader = train_loader(urls, rank=rank, world_size=2)
        take(loader, 3)
        state = [loader.state_dict()]  # a collective: gathers both ranks' positions
        torch.distributed.broadcast_object_list(state, src=0)  # every rank resumes from rank 0's checkpoint
        expected = [b["key"] for b in take(loader, 2)]
        resumed = train_loader(urls, rank=rank, world_size=2)
        resumed.load_state_dict(state[0])
        out[rank] = (sorted(state[0]["ranks"]), [b["key"] for b in take(resumed, 2)] == expected)
    finally:
        torch.distributed.destroy_process_group()


def test_state_dict_gathers_every_rank_under_torch_distributed(tmp_path):
    """Lightning saves rank 0's checkpoint only: its loader state must hold every rank's position."""
    import multiprocessing

    urls = shards(tmp_path, 2, per_shard=6)
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        out = manager.dict()
        args = (str(tmp_path / "init"), urls, out)
        processes = [context.Process(target=_rank_main, args=(rank, *args)) for rank in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        assert [p.exitcode for p in processes] == [0, 0]
        assert dict(out) == {0: ([0, 1], True), 1: ([0, 1], True)}


def test_pipe_urls_stream_and_a_failing_pipe_is_one_skipped_shard(tmp_path):
    good = write_shard(tmp_path / "good.tar", ["p0", "p1"])
    loader = EvalLoader(
        [f"pipe:cat {good}", f"pipe:cat {tmp_path / 'none.tar'} 2>/dev/null"], SampleTransform(16, False), 4
    )
    assert [k for b in loader for k in b["key"]] == ["p0", "p1"]
    assert loader.skipped == {"samples": 0, "shards": 1}


def _stream(urls: list[str], **kw):
    """A TrainStream of one source, run in this process (`iterate(worker, num_workers)`)."""
    from unilip.data.streams import TrainStream

    sources = kw.pop("sources", [TrainSource("a", tuple(urls), 1.0)])
    options = dict(batch_size=4, seed=0, epoch=0, rank=0, num_workers=1, rotation=0, positions=[0], shuffle_buffer=8,
                   max_consecutive_failures=5) | kw  # fmt: skip
    return TrainStream(sources, SampleTransform(16, train=True), **options)


def test_physical_worker_w_plays_virtual_worker_w_plus_rotation(tmp_path):
    """With 3 workers rotated by 1 (a resumed loader), worker 0 continues virtual worker 1's stream, worker 2
    virtual worker 0's: the same batches as the unrotated workers 1 and 0 give."""
    urls = shards(tmp_path, 2, per_shard=6)
    plain = _stream(urls, num_workers=3, positions=[0, 0, 0])
    rotated = _stream(urls, num_workers=3, rotation=1, positions=[0, 0, 0])
    for worker, vworker in [(0, 1), (1, 2), (2, 0)]:
        got = next(rotated.iterate(worker, 3))
        assert got["__meta__"]["vworker"] == vworker
        assert got["key"] == next(plain.iterate(vworker, 3))["key"]
    with pytest.raises(RuntimeError, match=r"^TrainStream built for 3 workers runs in 2$"):
        next(rotated.iterate(0, 2))


def test_training_augmentation_is_drawn_per_sample_and_the_buffer_of_one_keeps_file_order(tmp_path):
    """shuffle_buffer=1 holds nothing back: samples come in the shard's order. Each is randomly cropped and
    flipped (training), so some differ from their centre crop; two streams of one seed are identical."""
    (url,) = shards(tmp_path, 1, per_shard=8)
    batch = next(_stream([url], batch_size=8, shuffle_buffer=1).iterate(0, 1))
    assert batch["key"] == [f"s0_{j}" for j in range(8)]
    raw = list(read_shard(url, SkipCounter()))
    centre = torch.stack([torch.from_numpy(SampleTransform(16, train=False)(sample, None)["image"]) for sample in raw])
    centre = centre.permute(0, 3, 1, 2)
    evaluation = EvalLoader([url], SampleTransform(16, train=False), batch_size=8)
    assert torch.equal(next(iter(evaluation))["image"], centre)  # the comparison below is like for like
    differs = [not torch.equal(batch["image"][i], centre[i]) for i in range(8)]
    assert any(differs), "every training image was its centre crop: no augmentation"
    again = next(_stream([url], batch_size=8, shuffle_buffer=1).iterate(0, 1))
    assert torch.equal(batch["image"], again["image"])


def test_the_shuffle_buffer_releases_earlier_samples_as_it_reads(tmp_path):
    """A buffer of 20 over a 40-sample shard: of the first 21 samples out, some were read among the first 19
    (held in the buffer), and the shard's last sample is not always the one just read."""
    urls = shards(tmp_path, 1, per_shard=40)
    (batch,) = take(train_loader(urls, shuffle_buffer=20, batch_size=40, batches_per_epoch=1), 1)
    first = [int(key.split("_")[1]) for key in batch["key"][:21]]
    assert any(index < 19 for index in first)
    assert first != list(range(19, 40))


def test_two_sources_are_mixed_in_the_same_order_by_two_streams_of_one_seed(tmp_path):
    sources = [TrainSource(name, tuple(shards(tmp_path, 1, 10, prefix=name)), 0.5) for name in ("x", "y")]
    keys = [[k for batch in itertools.islice(_stream([], sources=sources).iterate(0, 1), 4) for k in batch["key"]]
            for _ in range(2)]  # fmt: skip
    assert keys[0] == keys[1]
    assert {k[0] for k in keys[0]} == {"x", "y"}


def test_empty_shard_reads_stop_the_run_after_exactly_max_consecutive_failures(tmp_path, monkeypatch):
    """Every read empty (no error either): the third read stops the run, and the message names the last url read;
    with unreadable shards it names the last error instead."""
    import unilip.data.streams as streams

    reads = []
    monkeypatch.setattr(streams, "read_shard", lambda url, counter: reads.append(url) or iter([]))
    url = str(tmp_path / "empty.tar")
    message = f"training source 'a': 3 shard reads in a row gave no sample (last: {url})"
    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        take(train_loader([url], max_consecutive_failures=3), 1)
    assert len(reads) == 3
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"\(last: .*nothere.tar: FileNotFoundError: "):
        take(train_loader([str(tmp_path / "nothere.tar")], max_consecutive_failures=3), 1)


@pytest.mark.parametrize("rank,logged", [(0, True), (1, False)])
def test_only_rank_0_logs_each_skipped_sample(tmp_path, caplog, rank, logged):
    """Skips are counted on every rank but named in the log by rank 0 only (one line per skip, not one per rank),
    in training and in validation."""
    from unilip.data.streams import EvalStream

    bad = write_shard(tmp_path / "bad.tar", ["g0", "b0", "g1", "g2", "g3", "g4"], bad=("b0",))
    urls = [str(tmp_path / "gone.tar"), str(bad)]
    with caplog.at_level("WARNING"):
        next(_stream([str(bad)], rank=rank, shuffle_buffer=1).iterate(0, 1))
        list(EvalStream(urls, SampleTransform(16, train=False), 4, rank, 1, 5).iterate(0, 1))
    assert caplog.text.count("skipped sample b0") == (2 if logged else 0)
    assert caplog.text.count("skipped shard") == (1 if logged else 0)  # validation's unreadable shard


def test_evaluation_batches_have_the_batch_size_and_name_their_worker_slot(tmp_path):
    """Worker w of rank r (of R ranks, W workers) reports slot r * W + w; its batches hold batch_size samples, the
    last one what is left, then an image-less end item."""
    from unilip.data.streams import EvalStream

    urls = shards(tmp_path, 4, per_shard=7)
    stream = EvalStream(urls, SampleTransform(16, train=False), 3, rank=1, world_size=2, max_consecutive_failures=5)
    items = list(stream.iterate(1, 2))  # rank 1 worker 1 of 2: shard 3 only (eval_shards)
    assert [len(item["key"]) for item in items[:-1]] == [3, 3, 1]
    assert [item["key"][0] for item in items[:-1]] == ["s3_0", "s3_3", "s3_6"]
    assert {item["__meta__"]["slot"] for item in items} == {3}
    assert items[-1]["__meta__"]["end"] and "key" not in items[-1]
