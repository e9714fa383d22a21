"""A latent cache is used only by a run that would compute the same tensors: anything that changes a cached latent
(the tokenizer's weights, any field of its config such as its normalisation, the image size, the resize mode, the
storage dtype) refuses the cache in one line naming the field; a byte-identical copy of the tokenizer elsewhere is
accepted; a cache whose fingerprint predates these fields is refused with the command that rebuilds it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.conftest import compose_train
from tests.generation_helpers import (
    cache_overrides,
    one_thread,  # noqa: F401  (autouse fixture)
)
from unilip.data import latent_cache
from unilip.models.tokenizer import TokenizerConfig
from unilip.tasks.generation.cache_latents import main as cache_main
from unilip.tasks.generation.target_cache import (
    check_caches,
    compute_dtype,
    fingerprint,
    tokenizer_config,
    tokenizer_digest,
    tokenizer_fields,
)
from unilip.training.config import ConfigError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fingerprint")


@pytest.fixture(scope="module")
def stage2(photos_dir, workdir, tokenizer_dir):
    """A saved stage-1 generator (stage 2's init_from) and a float32 cache of stage 2 made with `tokenizer_dir`."""
    from unilip.tasks.generation.setup import build_generation_training

    args = cache_overrides(photos_dir, workdir, tokenizer_dir, 1, "run_dir=unused")
    module = build_generation_training(compose_train(["task=generate", *args]))
    generator = workdir / "stage1_generator"
    module.generator.save_pretrained(generator, meta={"stage": 1, **module.metadata})
    extra = [f"init_from={generator}"]
    directory = workdir / "cache"
    args = cache_overrides(photos_dir, workdir, tokenizer_dir, 2, *extra)
    cache_main([*args, f"latent_cache.dir={directory}", "latent_cache.dtype=float32"])
    return directory, extra


def build(photos_dir, workdir, tokenizer, stage2, *more):
    """Build stage 2 of the quick start from the cache (no validation: the tokenizer is not even loaded)."""
    from unilip.tasks.generation.setup import build_generation_training

    directory, extra = stage2
    cache = [f"latent_cache.dir={directory}", "latent_cache.dtype=float32", "data.val_urls=null", "run_dir=unused"]
    args = cache_overrides(photos_dir, workdir, tokenizer, 2, *extra, *cache, *more)
    return build_generation_training(compose_train(["task=generate", *args]))


def copy_tokenizer(source, target, config=None, weights=None):
    """A copy of a saved tokenizer, with `config(dict)` applied to its config.json and `weights(dict)` to its
    state (each edits in place)."""
    shutil.copytree(source, target)
    if config is not None:
        meta = json.loads((target / "config.json").read_text())
        config(meta["config"])
        (target / "config.json").write_text(json.dumps(meta, indent=2))
    if weights is not None:
        state = load_file(target / "model.safetensors")
        weights(state)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _nudge(state):
    name = sorted(state)[len(state) // 2]
    state[name].view(-1)[0] += 1e-3


def test_a_copy_of_the_tokenizer_is_accepted_and_each_change_is_refused_naming_its_field(
    photos_dir, workdir, tokenizer_dir, stage2
):
    directory, _ = stage2
    same = copy_tokenizer(tokenizer_dir, workdir / "same")
    assert build(photos_dir, workdir, same, stage2) is not None  # another folder, the same bytes: accepted

    edits = {
        "image_mean": copy_tokenizer(
            tokenizer_dir, workdir / "mean", config=lambda c: c.update(image_mean=[0.4, 0.456, 0.406])
        ),
        "image_std": copy_tokenizer(tokenizer_dir, workdir / "std", config=lambda c: c.update(image_std=[0.5] * 3)),
        "weights": copy_tokenizer(tokenizer_dir, workdir / "weight", weights=_nudge),
    }
    messages = {}
    for field, tokenizer in edits.items():
        with pytest.raises(ConfigError) as refused:
            build(photos_dir, workdir, tokenizer, stage2)
        message = messages[field] = str(refused.value)
        assert "\n" not in message and field in message and str(directory / "photos") in message, message
        assert "cache_latents" in message  # the way to rebuild it
    # the cache's value and this run's, as one would write them in an override
    assert "=[0.485, 0.456, 0.406]; this run has [0.4, 0.456, 0.406]" in messages["image_mean"]

    for field, override in {
        "image_size": "stages.stage2.image_size=84",
        "resize": "data.resize=shorter_edge",
        "dtype": "latent_cache.dtype=bfloat16",
        "latent_scale": "latent_scale=5.0",
    }.items():
        with pytest.raises(ConfigError, match=rf"made with [\w.]*{field}=") as refused:
            build(photos_dir, workdir, tokenizer_dir, stage2, override)
        assert "\n" not in str(refused.value)


def test_the_latents_of_the_edited_tokenizer_do_differ(tokenizer_dir, workdir):
    """What the refusal protects: the copy with another image_mean encodes the same photo to other latents."""
    from torchvision.transforms.functional import pil_to_tensor

    from unilip.data.samples import load_photo
    from unilip.models import UniLIPTokenizer

    edited = copy_tokenizer(tokenizer_dir, workdir / "mean_latents", config=lambda c: c.update(image_mean=[0.4] * 3))
    images = (pil_to_tensor(load_photo("astronaut").resize((56, 56))).float() / 255)[None]
    with torch.no_grad():
        original = UniLIPTokenizer.from_pretrained(tokenizer_dir).eval().encode(images)
        other = UniLIPTokenizer.from_pretrained(edited).eval().encode(images)
    assert (original - other).abs().max() > 1e-3


def test_the_cache_command_refuses_an_edited_tokenizer_in_one_line_and_writes_nothing(
    photos_dir, workdir, tokenizer_dir, stage2
):
    directory, extra = stage2
    edited = copy_tokenizer(tokenizer_dir, workdir / "cli_mean", config=lambda c: c.update(image_std=[0.3] * 3))
    before = {p: p.stat().st_mtime_ns for p in directory.rglob("*")}
    args = cache_overrides(photos_dir, workdir, edited, 2, *extra)
    with pytest.raises(SystemExit) as exit_info:
        cache_main([*args, f"latent_cache.dir={directory}", "latent_cache.dtype=float32"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "image_std" in message, message
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*")} == before


def test_a_cache_with_the_old_fingerprint_is_refused_with_the_way_to_rebuild_it(
    photos_dir, workdir, tokenizer_dir, stage2
):
    """Caches written before the fingerprint held the tokenizer's config cannot show which normalisation made
    them: refused, with the command that rebuilds them."""
    directory, extra = stage2
    old = workdir / "old_cache"
    shutil.copytree(directory, old)
    manifest = latent_cache.read_manifest(old / "photos")
    manifest["fingerprint"] = {
        "version": 1,
        "latent_space": "unilip",
        "image_size": 56,
        "resize": "square",
        "latent_scale": 4.5,
        "target_encoder": {"tokenizer_sha256": "0" * 64},
        "source_encoder": {"tokenizer_sha256": "0" * 64, "source_size": 56},
        "compute": {"weights": "float32", "autocast": None},
        "dtype": "float32",
    }
    latent_cache.write_manifest(old / "photos", manifest)
    with pytest.raises(ConfigError) as refused:
        build(photos_dir, workdir, tokenizer_dir, (old, extra), f"latent_cache.dir={old}")
    message = str(refused.value)
    assert "\n" not in message and "version 1" in message and "cache_latents" in message, message


def test_a_released_pth_tokenizer_is_its_own_file_and_the_preset_config(tmp_path):
    """A released tokenizer (`1b_unilip.pth`) holds no config: the preset is its config, and its identity is the
    file's bytes, wherever the file lies; any other single file must be a unilip checkpoint."""
    preset = object()
    state = {"encoder.weight": torch.arange(6.0).view(2, 3)}
    digests = {}
    for name in ("1b_unilip.pth", "tokenizer.pt"):
        (tmp_path / "a").mkdir(exist_ok=True)
        torch.save(state, tmp_path / "a" / name)
        assert tokenizer_config(tmp_path / "a" / name, preset) is preset
        assert tokenizer_config(str(tmp_path / "a" / name), preset) is preset
        (tmp_path / "b").mkdir(exist_ok=True)
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
        digests[name] = tokenizer_digest(tmp_path / "a" / name)
        assert len(digests[name]) == 64 and tokenizer_digest(str(tmp_path / "b" / name)) == digests[name]
    changed = tmp_path / "c" / "1b_unilip.pth"
    changed.parent.mkdir()
    torch.save({"encoder.weight": torch.arange(6.0).view(2, 3) + 1}, changed)
    assert tokenizer_digest(changed) != digests["1b_unilip.pth"]
    torch.save(state, tmp_path / "weights.bin")
    with pytest.raises(ConfigError, match=r"weights\.bin is not a tokenizer run directory, checkpoint or saved"):
        tokenizer_config(tmp_path / "weights.bin", preset)


def test_a_refusal_shortens_digests_and_shows_every_other_value_whole():
    run = {
        "version": latent_cache.VERSION,
        "tokenizer": {"weights_sha256": "a" * 64, "encoder": "internvit-300m-448px-v2.5-long-name"},
        "image_mean": [0.5, 0.5, 0.5],
        "dtype": None,
    }
    cache = json.loads(json.dumps(run))
    cache["tokenizer"]["weights_sha256"] = "b" * 64
    assert latent_cache.refusal("cache/x", run, cache) == (
        f"the latent cache at cache/x was made with tokenizer.weights_sha256={'b' * 12}; this run has {'a' * 12}"
    )
    cache = json.loads(json.dumps(run))
    cache["tokenizer"]["encoder"] = "siglip2-so400m-patch16-naflex-other"
    assert latent_cache.refusal("cache/x", run, cache) == (
        "the latent cache at cache/x was made with tokenizer.encoder=siglip2-so400m-patch16-naflex-other; this run "
        "has internvit-300m-448px-v2.5-long-name"
    )
    cache = {**json.loads(json.dumps(run)), "image_mean": [0.485, 0.456, 0.406], "dtype": "bfloat16"}
    assert latent_cache.refusal("cache/x", run, cache) == (
        "the latent cache at cache/x was made with dtype=bfloat16; this run has null (also differs: image_mean)"
    )
    assert latent_cache.refusal("cache/x", run, json.loads(json.dumps(run))) is None


def test_a_run_directory_is_read_as_its_saved_tokenizer_and_a_broken_config_is_named(tokenizer_dir, tmp_path):
    """tokenizer_from may be a finished run (`<run>/tokenizer/`): its config and digest are the saved
    tokenizer's, read without building it."""
    from unilip.models.hub import UnreadableFileError

    saved = json.loads((tokenizer_dir / "config.json").read_text())["config"]
    run = tmp_path / "run"
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    preset = object()
    for source in (tokenizer_dir, run, str(run)):
        config = tokenizer_config(source, preset)
        assert config is not preset and config.vision == saved["vision"]
        assert config.latent_channels == saved["latent_channels"]
    assert tokenizer_digest(run) == tokenizer_digest(tokenizer_dir)
    (run / "tokenizer" / "config.json").write_text("{")
    with pytest.raises(UnreadableFileError, match=r"^tokenizer config '.*run/tokenizer/config\.json' is not valid"):
        tokenizer_config(run, preset)


# ------------------------------------------------------------------ the tokenizer's identity
def test_a_tokenizer_digest_is_the_same_in_every_release_and_wherever_the_weights_lie(tmp_path):
    """The digests are written into every cache.json: one that changes between releases refuses every cache
    made before. Pinned here for a released-style single file and for a sharded checkpoint directory."""
    single = tmp_path / "a" / "1b_unilip.pth"
    single.parent.mkdir()
    single.write_bytes(b"unilip weights")
    assert tokenizer_digest(single) == "556743ef3719097b4e560b4e3d0f74534d3fe6e0d278efacf69232406a3c0dfa"

    # an interrupted FSDP run: <run>/checkpoints/last.ckpt is a directory of shards, each named by its place
    sharded = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (sharded / "optim").mkdir(parents=True)
    (sharded / ".metadata").write_bytes(b"meta")
    (sharded / "__0_0.distcp").write_bytes(b"shard 0")
    (sharded / "optim" / "__0_0.distcp").write_bytes(b"moments")
    golden = "4e246d39c5d2196ec6d2682c6ec0f6e22753340ce8054f969027e526da7dfa5f"
    assert tokenizer_digest(tmp_path / "run") == tokenizer_digest(sharded) == golden
    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "run")
    assert tokenizer_digest(tmp_path / "elsewhere" / "run") == golden

    # the same bytes under another relative path (in the same order) are other weights
    (sharded / "optim").rename(sharded / "moments")
    assert tokenizer_digest(sharded) != golden


def test_a_checkpoint_directory_without_files_is_refused_naming_it(tmp_path):
    empty = tmp_path / "run" / "checkpoints" / "last.ckpt"
    empty.mkdir(parents=True)
    with pytest.raises(ConfigError) as refused:
        tokenizer_digest(tmp_path / "run")
    assert str(refused.value) == f"tokenizer {tmp_path / 'run'}: no weight files at {empty}"


def _config(**changes) -> TokenizerConfig:
    return TokenizerConfig(**{"vision": {"hidden_size": 8}, "llm_hidden_size": 16, "latent_channels": 4, **changes})


def test_an_interrupted_runs_tokenizer_config_is_read_from_its_last_checkpoint(tmp_path):
    """A run killed before it saved its tokenizer has only checkpoints: its config is the checkpoint's, and the
    checkpoint's bytes are its identity; another task's checkpoint is refused naming the task."""
    config = _config(latent_channels=6, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = {"unilip": {"task": "tokenizer", "tokenizer_config": config.to_dict()}, "state_dict": {}}
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    preset = object()
    for source in (run, str(run), run / "checkpoints" / "last.ckpt"):
        assert tokenizer_config(source, preset) == config
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "last.ckpt")
    assert tokenizer_digest(run) == tokenizer_digest(tmp_path / "last.ckpt")

    checkpoint["unilip"]["task"] = "generate"
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError) as refused:
        tokenizer_config(run, preset)
    last = run / "checkpoints" / "last.ckpt"
    assert str(refused.value) == f"{last} is a generate checkpoint, not a unilip tokenizer one"


def test_the_tokenizer_fields_leave_its_latent_scale_to_the_fingerprint():
    """The scale in use is the fingerprint's own field (an override may replace the config's): a tokenizer whose
    config.json gained a measured scale is the same tokenizer; any other field is another."""
    fields = tokenizer_fields("d" * 64, _config(latent_scale=None))
    assert "latent_scale" not in fields and fields["weights_sha256"] == "d" * 64
    assert tokenizer_fields("d" * 64, _config(latent_scale=10.6)) == fields
    assert tokenizer_fields("d" * 64, _config(latent_channels=8)) != fields


# ------------------------------------------------------------------ the fingerprint
def test_the_compute_dtypes_follow_the_precision_and_an_unsupported_one_is_refused():
    def cfg(trainer, frozen=None):
        return OmegaConf.create({"trainer": trainer, "module": {"frozen_dtype": frozen}})

    assert compute_dtype(cfg({})) == {"weights": "float32", "autocast": None}  # Lightning's default, 32-true
    assert compute_dtype(cfg({"precision": "32"})) == {"weights": "float32", "autocast": None}
    bf16 = compute_dtype(cfg({"precision": "bf16-mixed"}, "bfloat16"))
    assert bf16 == {"weights": "bfloat16", "autocast": "bfloat16"}
    assert compute_dtype(cfg({"precision": "16-mixed"})) == {"weights": "float32", "autocast": "float16"}
    with pytest.raises(ConfigError) as refused:
        compute_dtype(cfg({"precision": "64-true"}))
    assert str(refused.value) == (
        "trainer.precision=64-true: cached targets support ['16-mixed', '32', '32-true', 'bf16-mixed']"
    )


@pytest.fixture(scope="module")
def stage_cfgs():
    return {stage: compose_train(["task=generate", f"stage={stage}"]) for stage in (1, 2)}


def test_the_fingerprint_is_the_record_cache_json_holds(stage_cfgs):
    """The fingerprint's field names are the format of every cache.json written so far: renaming one refuses
    them all. The DC-AE is part of it in DC-AE latent space (stage 1) only."""
    tokenizer = {"weights_sha256": "d" * 64, "image_mean": (0.5, 0.5, 0.5)}
    dcae = {"weights_sha256": "e" * 64, "scaling_factor": 0.41407}
    stage1 = fingerprint(stage_cfgs[1], tokenizer, 0.41407, dcae)
    assert stage1 == {
        "version": 2,
        "latent_space": "dcae",
        "image_size": 512,
        "resize": "square",
        "latent_scale": 0.41407,
        "tokenizer": {"weights_sha256": "d" * 64, "image_mean": [0.5, 0.5, 0.5]},
        "dcae": {"weights_sha256": "e" * 64, "scaling_factor": 0.41407},
        "source_size": 56,
        "compute": {"weights": "float32", "autocast": "bfloat16"},
        "dtype": "bfloat16",
    }
    stage2 = fingerprint(stage_cfgs[2], tokenizer, 10.6, dcae)
    assert stage2["latent_space"] == "unilip" and stage2["dcae"] is None and stage2["latent_scale"] == 10.6
    assert set(stage2) == set(stage1)
    # a stage-1 run of another DC-AE computes other targets; a stage-2 run does not run the DC-AE at all
    other = {**dcae, "weights_sha256": "f" * 64}
    assert fingerprint(stage_cfgs[1], tokenizer, 0.41407, other) != stage1
    assert fingerprint(stage_cfgs[2], tokenizer, 10.6, other) == stage2
    assert fingerprint(stage_cfgs[1], tokenizer, 0.41407, None)["dcae"] == {}


def test_an_unknown_storage_dtype_is_refused_with_the_ones_there_are(stage_cfgs):
    cfg = stage_cfgs[2].copy()
    cfg.latent_cache.dtype = "float8"
    with pytest.raises(ConfigError) as refused:
        fingerprint(cfg, {}, 1.0, None)
    assert str(refused.value) == "latent_cache.dtype=float8; use one of ['bfloat16', 'float16', 'float32']"


# ------------------------------------------------------------------ refusals of a cache
RUN = {"version": latent_cache.VERSION, "image_size": 448, "dcae": None, "dtype": "bfloat16"}
FIX = (
    "rebuild it for this run (python -m unilip.tasks.generation.cache_latents <this run's overrides> "
    "latent_cache.dir=<a new directory>), or run with the settings its cache.json records"
)


def test_check_caches_refuses_a_foreign_manifest_one_without_a_fingerprint_and_one_made_otherwise():
    made = {"format": latent_cache.FORMAT, "directory": "c/photos", "fingerprint": dict(RUN)}
    check_caches({"photos": made}, RUN)  # the same: accepted
    with pytest.raises(ConfigError) as refused:
        check_caches({"photos": {**made, "format": "webdataset"}}, RUN)
    assert str(refused.value) == "c/photos is not a latent cache (format='webdataset')"
    with pytest.raises(ConfigError) as refused:
        check_caches({"photos": {"format": latent_cache.FORMAT, "directory": "c/photos"}}, RUN)
    assert str(refused.value).startswith(
        "the latent cache at c/photos has a fingerprint of version None, this unilip writes version 2 "
    )
    assert str(refused.value).endswith(f"its latents are this run's; {FIX}")
    with pytest.raises(ConfigError) as refused:
        check_caches({"photos": {**made, "fingerprint": {**RUN, "image_size": 256}}}, RUN)
    assert str(refused.value) == f"the latent cache at c/photos was made with image_size=256; this run has 448; {FIX}"


def test_a_field_on_one_side_only_and_a_record_against_nothing_are_differences():
    """A cache from a release with fewer fields, or one that recorded a DC-AE where this run records none,
    differs in exactly those fields."""
    assert latent_cache.differences({"a": 1, "b": 2}, {"a": 1}) == [("b", None, 2)]
    assert latent_cache.differences({"a": 1}, {"a": 1, "c": 3}) == [("c", 3, None)]
    assert latent_cache.differences({"dcae": None}, {"dcae": {"weights_sha256": "e"}}) == [
        ("dcae", {"weights_sha256": "e"}, None)
    ]
    assert latent_cache.differences({"dcae": {"weights_sha256": "e"}}, {"dcae": None}) == [
        ("dcae", None, {"weights_sha256": "e"})
    ]
    assert latent_cache.differences({"t": {"x": 1, "y": 2}}, {"t": {"x": 0, "y": 2}}) == [("t.x", 0, 1)]


def test_a_refusal_names_the_first_field_then_every_other_and_the_version_it_writes():
    cache = {**RUN, "dcae": {"scaling_factor": 1.0}, "dtype": "float32", "image_size": 256}
    assert latent_cache.refusal("c/x", RUN, cache) == (
        'the latent cache at c/x was made with dcae={"scaling_factor": 1.0}; this run has null '
        "(also differs: dtype, image_size)"
    )
    assert latent_cache.refusal("c/x", RUN, {**RUN, "version": 1}) == (
        "the latent cache at c/x has a fingerprint of version 1, this unilip writes version 2 (which also records "
        "the tokenizer's config, its normalisation included); nothing in it shows that its latents are this run's"
    )
