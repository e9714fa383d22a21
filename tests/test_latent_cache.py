"""Cached generation targets: `python -m unilip.tasks.generation.cache_latents` writes what the training step would
compute, training reads it in place of the images (same loss, no encoder run, the tokenizer not even loaded), a
cache made otherwise is refused, an interrupted caching run resumes without duplicates or gaps, and a corrupt cached
sample is skipped and counted like an undecodable image."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train
from tests.generation_helpers import cache_overrides as overrides
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers import run_tree
from unilip.data import latent_cache
from unilip.data.shards import DataError, SkipCounter, expand_urls, read_shard
from unilip.data.transforms import batch_to_float
from unilip.tasks.generation.cache_latents import main as cache_main
from unilip.training.config import ConfigError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def compose(photos_dir, workdir, tokenizer_dir, stage, *extra):
    return compose_train(["task=generate", *overrides(photos_dir, workdir, tokenizer_dir, stage, *extra)])


@pytest.fixture(scope="module")
def stage1_generator(photos_dir, workdir, tokenizer_dir):
    """A saved stage-1 generator (untrained), so that stage 2 has its init_from."""
    from unilip.tasks.generation.setup import build_generation_training

    module = build_generation_training(compose(photos_dir, workdir, tokenizer_dir, 1, "run_dir=unused"))
    directory = workdir / "stage1_generator"
    module.generator.save_pretrained(directory, meta={"stage": 1, **module.metadata})
    return directory


@pytest.fixture(scope="module")
def fp32_caches(photos_dir, workdir, tokenizer_dir, stage1_generator):
    """Caches of stage 1 (DC-AE latents of photos) and stage 2 (UniLIP latents of photos and edits) in float32."""
    caches = {}
    for stage, extra in ((1, []), (2, [f"init_from={stage1_generator}"])):
        directory = workdir / f"fp32_stage{stage}"
        args = overrides(photos_dir, workdir, tokenizer_dir, stage, *extra)
        summary = cache_main([*args, f"latent_cache.dir={directory}", "latent_cache.dtype=float32"])
        caches[stage] = (directory, extra, summary)
    return caches


def first_batches(cfg, count):
    data = instantiate(cfg.data)
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    return data, [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("stage", [1, 2])
def test_training_from_the_cache_gives_the_loss_of_encoding_on_the_fly(
    photos_dir, workdir, tokenizer_dir, fp32_caches, stage
):
    """The same training stream (same seed: the same samples in the same order), once as images encoded in the
    step and once as cached fp32 latents: the same targets, edit features and flow loss on every batch."""
    from unilip.tasks.generation.setup import build_generation_training

    directory, extra, summary = fp32_caches[stage]
    images_cfg = compose(photos_dir, workdir, tokenizer_dir, stage, *extra, "run_dir=unused")
    cached_cfg = compose(photos_dir, workdir, tokenizer_dir, stage, *extra, "run_dir=unused")
    cached_cfg.latent_cache.dir, cached_cfg.latent_cache.dtype = str(directory), "float32"
    module = build_generation_training(images_cfg)  # encodes on the fly
    module._place_frozen()
    _, image_batches = first_batches(images_cfg, 3)
    data, cached_batches = first_batches(cached_cfg, 3)
    assert data.caches is not None and set(data.caches) == {s["name"] for s in images_cfg.data.train_sources}
    assert summary["samples"] == sum(m["samples"] for m in data.caches.values()) and summary["skipped"] == 0
    edits = 0
    for images, cached in zip(image_batches, cached_batches, strict=True):
        assert cached["key"] == images["key"] and cached["caption"] == images["caption"]
        assert "image" not in cached and cached["latent"].dtype == torch.float32
        images = batch_to_float(images)
        with torch.no_grad():
            x0, _, features = module.inputs(images, drop=False)
            x0_cached, _, features_cached = module.inputs(cached, drop=False)
            torch.testing.assert_close(x0_cached, x0, rtol=1e-5, atol=1e-6)
            if features is not None:
                edits += features.shape[0]
                torch.testing.assert_close(features_cached.float(), features.float(), rtol=1e-5, atol=1e-6)
            else:
                assert features_cached is None
            loss, loss_cached = module.fixed_timestep_loss(images), module.fixed_timestep_loss(cached)
        assert loss.item() > 0 and loss_cached.item() == pytest.approx(loss.item(), rel=1e-5)
    assert (edits > 0) == (stage == 2)  # stage 2 mixes edits in: their source features come from the cache


def test_a_stage_trained_on_its_cache_matches_on_the_fly_and_never_loads_the_tokenizer(
    photos_dir, workdir, tokenizer_dir, fp32_caches, monkeypatch
):
    """Three steps of stage 2 through train(), without validation: the cached run logs the losses of the run that
    encodes every batch, ends with the same weights, and never builds a tokenizer or a DC-AE."""
    from safetensors.torch import load_file

    from unilip.models import tokenizer as tokenizer_module
    from unilip.training.run import train

    directory, extra, _ = fp32_caches[2]
    common = [*extra, "data.val_urls=null", "stages.stage2.max_steps=3", "data.train_batches_per_epoch=3"]
    runs = {}
    built = []
    original = tokenizer_module.UniLIPTokenizer.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(tokenizer_module.UniLIPTokenizer, "__init__", counting)
    for name, cache in (("images", []), ("cached", [f"latent_cache.dir={directory}", "latent_cache.dtype=float32"])):
        built.clear()
        run_dir = workdir / "runs" / name
        runs[name] = train(compose(photos_dir, workdir, tokenizer_dir, 2, *common, *cache, f"run_dir={run_dir}"))
        runs[name + "/tokenizers built"] = len(built)
    assert runs["images/tokenizers built"] >= 1 and runs["cached/tokenizers built"] == 0

    def losses(run_dir):
        with open(next(run_dir.rglob("metrics.csv"))) as handle:
            rows = list(csv.DictReader(handle))
        return [float(r["loss/flow"]) for r in rows if r.get("loss/flow")]

    on_the_fly, cached = losses(runs["images"]), losses(runs["cached"])
    assert len(on_the_fly) == 3 and cached == pytest.approx(on_the_fly, rel=1e-5)
    # The same updates: AdamW divides by the root of tiny second moments, so fp32 rounding in the targets moves
    # some weights by a hair; relative to how far the three steps moved them, the runs agree.
    initial = load_file(extra[0].split("=", 1)[1] + "/model.safetensors")
    images, cached = (load_file(runs[name] / "generator" / "model.safetensors") for name in ("images", "cached"))
    assert images.keys() == cached.keys() == initial.keys()
    moved = torch.cat([(images[k] - initial[k]).flatten() for k in initial]).norm()
    apart = torch.cat([(cached[k] - images[k]).flatten() for k in initial]).norm()
    print(f"update norm {moved:.3e}, cached vs on the fly {apart:.3e}")
    assert moved > 0 and apart < 1e-3 * moved


def test_a_cached_run_reads_no_image_shard(photos_dir, workdir, tokenizer_dir, fp32_caches):
    """Once cached, the images may be gone: the data module reads and checks only the cache."""
    directory, _, summary = fp32_caches[1]
    gone = "[{name: photos, urls: /nowhere/train-*.tar, weight: 1.0}]"
    cfg = compose(
        photos_dir,
        workdir,
        tokenizer_dir,
        1,
        f"latent_cache.dir={directory}",
        f"data.train_sources={gone}",
        "run_dir=x",
    )
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["latent"].shape == (cfg.data.batch_size, 32, 2, 2) and "image" not in batch
    assert data.epoch_samples()[1] == {"photos": (None, summary["samples"])}  # counted from the cache's index


def test_a_cache_made_otherwise_is_refused_with_the_fields_that_differ(
    photos_dir, workdir, tokenizer_dir, fp32_caches, tiny_config
):
    from unilip.models import UniLIPTokenizer
    from unilip.tasks.generation.setup import build_generation_training

    directory, extra, _ = fp32_caches[2]
    cache = [f"latent_cache.dir={directory}", "latent_cache.dtype=float32", "data.val_urls=null"]

    def build(*more, tokenizer=tokenizer_dir):
        args = overrides(photos_dir, workdir, tokenizer, 2, *extra, *cache, *more, "run_dir=unused")
        return build_generation_training(compose_train(["task=generate", *args]))

    build()  # the settings the cache was made with: accepted
    with pytest.raises(ConfigError, match=r"made with latent_scale=4\.5; this run has 5\.0"):
        build("latent_scale=5.0")
    with pytest.raises(ConfigError, match=r"made with dtype=float32; this run has bfloat16"):
        build("latent_cache.dtype=bfloat16")
    with pytest.raises(ConfigError, match=r"made with source_size=56; this run has 84"):
        build("mllm.source_size=84")
    other = workdir / "other_tokenizer"
    torch.manual_seed(1)
    UniLIPTokenizer(tiny_config).save_pretrained(other)
    with pytest.raises(
        ConfigError, match=r"made with tokenizer\.weights_sha256=[0-9a-f]{12}; this run has [0-9a-f]{12}"
    ):
        build(tokenizer=other)


def test_the_cache_command_refuses_to_add_to_a_cache_made_otherwise_and_writes_nothing(
    photos_dir, workdir, tokenizer_dir, fp32_caches, capsys
):
    directory, extra, _ = fp32_caches[2]
    before = {p: p.stat().st_mtime_ns for p in directory.rglob("*")}
    args = overrides(photos_dir, workdir, tokenizer_dir, 2, *extra)
    with pytest.raises(SystemExit) as exit_info:
        cache_main([*args, f"latent_cache.dir={directory}", "latent_cache.dtype=bfloat16"])
    assert "was made with dtype=float32; this run has bfloat16" in str(exit_info.value.code)
    with pytest.raises(SystemExit, match=r"latent_cache\.dir=<directory> is required"):
        cache_main(args)
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*")} == before


def _keys(directory):
    return [s["__key__"] for url in expand_urls(str(directory / "*.tar")) for s in read_shard(url, SkipCounter())]


def test_an_interrupted_cache_resumes_without_duplicates_or_gaps(
    photos_dir, workdir, tokenizer_dir, monkeypatch, capsys
):
    """Interrupted while writing its second shard, the cache is incomplete (training refuses it); run again, it
    keeps the finished shard as it was, writes the rest, and holds every input sample exactly once."""
    from unilip.tasks.generation import cache_latents

    directory = workdir / "resumed"
    args = [*overrides(photos_dir, workdir, tokenizer_dir, 1), f"latent_cache.dir={directory}"]
    inputs = expand_urls(str(photos_dir / "photos" / "train-*.tar"))
    assert len(inputs) >= 3
    first_shard = sum(1 for _ in read_shard(inputs[0], SkipCounter()))
    calls = []
    original = cache_latents.pack

    def interrupted(*arguments):
        calls.append(1)
        if len(calls) == first_shard + 5:  # in the middle of the second shard
            raise KeyboardInterrupt
        return original(*arguments)

    monkeypatch.setattr(cache_latents, "pack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_main(args)
    source = directory / "photos"
    done = sorted(source.glob("*.tar"))
    assert [p.name for p in done] == [inputs[0].split("/")[-1]] and list(source.glob("*.partial"))
    assert not latent_cache.read_manifest(source)["complete"]
    cached_cfg = compose(photos_dir, workdir, tokenizer_dir, 1, f"latent_cache.dir={directory}", "run_dir=unused")
    data = instantiate(cached_cfg.data)
    with pytest.raises(DataError, match="is incomplete"):
        data.setup("fit")
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}

    monkeypatch.setattr(cache_latents, "pack", original)
    summary = cache_main(args)
    assert summary["already"] == 1 and summary["shards"] == len(inputs) - 1
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == kept
    assert not list(source.glob("*.partial")) and latent_cache.read_manifest(source)["complete"]
    expected = [s["__key__"] for url in inputs for s in read_shard(url, SkipCounter())]
    assert sorted(_keys(source)) == sorted(expected) and len(set(expected)) == len(expected)
    from unilip.data.index import read_index

    assert sum(read_index(source).values()) == len(expected)
    assert "were cached already" in capsys.readouterr().out


def _rewrite(shard, corrupt_key):
    """Rewrite a cached shard with the latents of `corrupt_key` cut in half."""
    members = []
    with tarfile.open(shard) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            if member.name == f"{corrupt_key}.{latent_cache.MEMBER}":
                data = data[: len(data) // 2]
            members.append((member.name, data))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_corrupt_cached_sample_is_skipped_and_counted(photos_dir, workdir, tokenizer_dir, fp32_caches):
    import shutil

    directory, _, _ = fp32_caches[1]
    copy = workdir / "corrupt"
    shutil.copytree(directory, copy)
    shards = sorted((copy / "photos").glob("*.tar"))
    for shard in shards[1:]:  # one shard, so that an epoch certainly passes the bad sample
        shard.unlink()
    keys = _keys(copy / "photos")
    _rewrite(shards[0], keys[3])
    cfg = compose(
        photos_dir, workdir, tokenizer_dir, 1, f"latent_cache.dir={copy}", "data.shuffle_buffer=4", "run_dir=unused"
    )
    cfg.data.train_batches_per_epoch = 2 * len(keys) // cfg.data.batch_size  # every sample read twice or so
    data = instantiate(cfg.data)
    data.setup("fit")
    seen = [key for batch in data.train_dataloader() for key in batch["key"]]
    assert keys[3] not in seen and set(seen) <= set(keys) and len(set(seen)) > len(keys) // 2
    assert data.skipped["train/samples"] >= 1 and data.skipped["train/shards"] == 0


def test_unpack_refuses_anything_but_a_well_formed_cached_sample():
    latent, features = torch.randn(4, 2, 2), torch.randn(3, 5)
    got, got_features = latent_cache.unpack(latent_cache.pack(latent, features, torch.bfloat16))
    assert (
        got.dtype == torch.bfloat16
        and torch.equal(got, latent.bfloat16())
        and torch.equal(got_features, features.bfloat16())
    )
    assert latent_cache.unpack(latent_cache.pack(latent, None, torch.float32))[1] is None
    from safetensors.torch import save

    bad = {
        "truncated": latent_cache.pack(latent, None, torch.float32)[:-7],
        "not safetensors": b"\x00" * 40,
        "no latent": save({"source_features": features}),
        "a stray tensor": save({"latent": latent, "extra": features}),
        "a flat latent": save({"latent": latent.flatten()}),
        "integer latent": save({"latent": latent.long()}),
        "NaN": save({"latent": torch.where(torch.arange(16).view(4, 2, 2) == 5, float("nan"), latent)}),
        "3-d features": save({"latent": latent, "source_features": features[None]}),
    }
    for name, data in bad.items():
        with pytest.raises(ValueError):
            latent_cache.unpack(data)
        assert name


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(photos_dir, workdir, tokenizer_dir, fp32_caches):
    """torchrun with 2 CPU processes splits the shards and writes byte-identical shards, counts and manifests."""
    import os
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    directory, extra, summary = fp32_caches[2]
    out = workdir / "two_processes"
    args = overrides(photos_dir, workdir, tokenizer_dir, 2, *extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [
        "-m",
        "unilip.tasks.generation.cache_latents",
        *args,
        f"latent_cache.dir={out}",
        "latent_cache.dtype=float32",
    ]
    result = run_tree(command, cwd=repo, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"cached {summary['samples']} samples (0 skipped)" in result.stdout  # each shard on one rank only
    assert "2 process(es)" in result.stdout
    one, two = (
        sorted(p.relative_to(directory) for p in directory.rglob("*")),
        sorted(p.relative_to(out) for p in out.rglob("*")),
    )
    assert one == two
    for name in one:
        if name.suffix == ".tar" or name.name == "index.json":
            assert (out / name).read_bytes() == (directory / name).read_bytes(), name
        elif name.name == latent_cache.MANIFEST:
            mine, theirs = (latent_cache.read_manifest((root / name).parent) for root in (out, directory))
            assert mine["fingerprint"] == theirs["fingerprint"] and mine["complete"]
            assert {k: v["samples"] for k, v in mine["shards"].items()} == {
                k: v["samples"] for k, v in theirs["shards"].items()
            }


def test_a_cached_sample_without_a_caption_and_batches_of_mixed_rows_and_of_mixed_shapes():
    """A cached sample without `txt` has the empty caption; a batch mixes edit rows (with source features) and
    text-to-image rows; latents of two shapes in one batch are refused, naming both."""
    dtype = torch.float32
    plain = {"__key__": "a", latent_cache.MEMBER: latent_cache.pack(torch.ones(4, 2, 2), None, dtype)}
    edit = {"__key__": "b", "txt": b"  a red cube \n",
            latent_cache.MEMBER: latent_cache.pack(torch.zeros(4, 2, 2), torch.full((3, 5), 2.0), dtype)}  # fmt: skip
    first, second = latent_cache.cached_example(plain), latent_cache.cached_example(edit)
    assert first["caption"] == "" and first["source_features"] is None and first["key"] == "a"
    assert second["caption"] == "a red cube" and second["source_features"].shape == (3, 5)
    batch = latent_cache.collate_cached([first, second])
    assert batch["latent"].shape == (2, 4, 2, 2) and batch["caption"] == ["", "a red cube"]
    assert batch["has_source"].tolist() == [False, True] and batch["key"] == ["a", "b"]
    assert torch.equal(batch["source_features"], torch.full((1, 3, 5), 2.0))
    assert "source_features" not in latent_cache.collate_cached([first, first])
    other = {"__key__": "c", latent_cache.MEMBER: latent_cache.pack(torch.ones(4, 3, 3), None, dtype)}
    with pytest.raises(ValueError) as refused:
        latent_cache.collate_cached([first, latent_cache.cached_example(other)])
    assert str(refused.value) == (
        "cached latents of different shapes [(4, 2, 2), (4, 3, 3)] in one batch; the caches differ"
    )


def test_a_malformed_cached_sample_is_refused_saying_what_is_wrong():
    """What the loader logs when it skips a cached sample: each message whole."""
    save = latent_cache.save_tensors
    with pytest.raises(ValueError, match=r"^cached latents do not parse \(SafetensorError: "):
        latent_cache.unpack(b"not a safetensors file")
    cases = [
        ({"latent": torch.zeros(4, 2, 2), "extra": torch.zeros(1)},
         "cached sample holds ['extra', 'latent'], expected latent [+ source_features]"),
        ({"source_features": torch.zeros(3, 5)},
         "cached sample holds ['source_features'], expected latent [+ source_features]"),
        ({"latent": torch.zeros(2, 2)}, "cached latent of shape (2, 2) and torch.float32; expected (C, h, w) float"),
        ({"latent": torch.zeros(4, 2, 2, dtype=torch.int64)},
         "cached latent of shape (4, 2, 2) and torch.int64; expected (C, h, w) float"),
        ({"latent": torch.zeros(4, 2, 2), "source_features": torch.zeros(3)},
         "cached source features of shape (3,); expected (N, D) float"),
        ({"latent": torch.full((4, 2, 2), float("nan"))}, "cached sample holds non-finite values"),
        ({"latent": torch.zeros(4, 2, 2), "source_features": torch.full((3, 5), float("inf"))},
         "cached sample holds non-finite values"),
    ]  # fmt: skip
    for tensors, message in cases:
        with pytest.raises(ValueError) as refused:
            latent_cache.unpack(save(tensors))
        assert str(refused.value) == message


def test_a_run_validates_when_it_has_validation_shards_and_does_not_limit_them_to_zero():
    """Whether a cached run still needs its encoders: only validation encodes images and decodes samples."""
    from omegaconf import OmegaConf

    from unilip.tasks.generation.target_cache import validates

    def cfg(val_urls, **trainer):
        return OmegaConf.create({"data": {"val_urls": val_urls}, "trainer": trainer})

    assert validates(cfg("photos/val-{0..1}.tar")) and validates(cfg(["a.tar"], limit_val_batches=0.5))
    assert validates(cfg("v.tar", limit_val_batches=2))
    assert not validates(cfg(None)) and not validates(cfg("", limit_val_batches=1.0))
    assert not validates(cfg("v.tar", limit_val_batches=0)) and not validates(cfg("v.tar", limit_val_batches=0.0))


# ------------------------------------------------------------------ reading the cache directories
def _manifest(directory, **fields):
    return latent_cache.write_manifest(directory, {"format": latent_cache.FORMAT, "complete": True, **fields})


def test_an_unreadable_or_foreign_manifest_is_refused_naming_the_file(tmp_path):
    assert latent_cache.read_manifest(tmp_path) is None
    (tmp_path / "cache.json").write_text("{")
    with pytest.raises(DataError) as refused:
        latent_cache.read_manifest(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'cache.json'} is not readable (Expecting property name")
    assert str(refused.value).endswith("); delete it and cache this source again")
    (tmp_path / "cache.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError) as refused:
        latent_cache.read_manifest(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'cache.json'} is not a latent cache manifest (format='other')"


def test_a_cache_directory_without_a_source_names_the_source_and_the_command(tmp_path):
    _manifest(tmp_path / "photos")
    sources = [{"name": "photos", "urls": "x"}, {"name": "edits", "urls": "y"}, {"name": "art", "urls": "z"}]
    with pytest.raises(DataError) as refused:
        latent_cache.with_cache(sources, tmp_path)
    assert str(refused.value) == (
        f"data.latent_cache={tmp_path} holds no cache of source(s) ['edits', 'art'] (no cache.json in "
        f"{tmp_path / 'edits'}); make it with `python -m unilip.tasks.generation.cache_latents` and the overrides "
        "of this run"
    )
    assert latent_cache.with_cache(sources[:1], tmp_path) == [{"name": "photos", "urls": f"{tmp_path}/photos/*.tar"}]


def test_a_source_that_mixes_a_cache_with_other_shards_is_refused(tmp_path):
    cached, images = tmp_path / "cached", tmp_path / "images"
    _manifest(cached)
    images.mkdir()
    mixed = [str(cached / "0.tar"), str(images / "0.tar")]
    with pytest.raises(DataError) as refused:
        latent_cache.source_caches({"photos": mixed})
    assert str(refused.value) == (
        f"data source 'photos' mixes cached latents ({cached}) with shards of other directories"
    )
    with pytest.raises(DataError) as refused:
        latent_cache.source_caches({"photos": [str(cached / "0.tar"), "https://host/0.tar"]})
    assert str(refused.value) == f"data source 'photos' mixes cached latents ({cached}) with remote shards"


def test_an_incomplete_cache_says_how_far_it_got(tmp_path):
    _manifest(tmp_path / "a", complete=False, inputs=3, shards={"0.tar": {}})
    _manifest(tmp_path / "b", complete=False, shards={})
    for directory, counts in (("a", "1 of 3"), ("b", "0 of ?")):
        with pytest.raises(DataError) as refused:
            latent_cache.source_caches({"photos": [str(tmp_path / directory / "0.tar")]})
        assert str(refused.value) == (
            f"the latent cache {tmp_path / directory} is incomplete ({counts} shards); finish it by running the same "
            "`python -m unilip.tasks.generation.cache_latents` command again"
        )


def test_a_stage_with_cached_and_image_sources_names_both(tmp_path):
    for name in ("a", "b"):
        _manifest(tmp_path / name)
    (tmp_path / "images").mkdir()
    sources = {
        "art": [str(tmp_path / "a" / "0.tar")],
        "photos": [str(tmp_path / "images" / "0.tar")],
        "edits": [str(tmp_path / "b" / "0.tar")],
    }
    with pytest.raises(DataError) as refused:
        latent_cache.source_caches(sources)
    assert str(refused.value) == (
        "data sources ['photos'] are images while ['art', 'edits'] are cached latents; cache every source of the "
        "stage (python -m unilip.tasks.generation.cache_latents) or none"
    )
    del sources["photos"]
    found = latent_cache.source_caches(sources)
    assert {name: m["directory"] for name, m in found.items()} == {
        "art": str(tmp_path / "a"),
        "edits": str(tmp_path / "b"),
    }


def test_a_source_whose_urls_match_nothing_is_named_by_its_option(tmp_path):
    with pytest.raises(DataError) as refused:
        latent_cache.expand_sources([{"name": "photos", "urls": str(tmp_path / "*.tar")}])
    assert str(refused.value).startswith("data.train_sources[photos].urls: no shard matches")
