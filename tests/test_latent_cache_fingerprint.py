"""A latent cache is used only by a run that would compute the same tensors: anything that changes a cached latent
(the tokenizer's weights, any field of its config such as its normalisation, the image size, the resize mode, the
storage dtype) refuses the cache in one line naming the field; a byte-identical copy of the tokenizer elsewhere is
accepted; a cache whose fingerprint predates these fields is refused with the command that rebuilds it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import compose_train
from tests.generation_helpers import (
    cache_overrides,
    one_thread,  # noqa: F401  (autouse fixture)
)
from unilip.data import latent_cache
from unilip.tasks.generation.cache_latents import main as cache_main
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
    from unilip.tasks.generation.target_cache import tokenizer_config, tokenizer_digest

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
    from unilip.tasks.generation.target_cache import tokenizer_config, tokenizer_digest

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
