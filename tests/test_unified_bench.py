"""python -m unilip.benchmarks unified (Unified-Bench): every image captioned by the MLLM over the UniLIP encoder,
regenerated from its caption by the shared sampler, and scored by vision encoders; the scores recomputed here
through transformers' own image processor and model; a rerun reuses everything; mistakes are one line."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests import sampling_helpers as data
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.test_unified_similarity import save_tiny_encoder
from unilip.benchmarks.__main__ import main

SIZE = 56
FAST = [f"sampler.size={SIZE}", "sampler.steps=2", "batch_size=4", "benchmark.max_new_tokens=6"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return data.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {family: save_tiny_encoder(family, root / family) for family in ("clip", "dinov2")}


def run(generator_dir, out, photos, encoders, *overrides):
    specs = ",".join(f"{{name:{name},weights:'{directory}'}}" for name, (directory, _) in encoders.items())
    return main(["unified", f"generator={generator_dir}", f"out={out}", f"prompts={photos}",
                 f"reward.encoders=[{specs}]", *FAST, *overrides])  # fmt: skip


def test_captions_regenerations_and_scores(generator_dir, encoders, tmp_path, caplog):
    from unilip.models.captioner import build_captioner
    from unilip.models.generator import read_meta
    from unilip.models.mllm import MLLMPreset
    from unilip.pipelines import UniLIPPipeline

    photos = tmp_path / "photos"
    data.photo_files(photos, ["a.jpg", "sub/b.png", "c.jpg"], side=48)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="unilip"):
        results = run(generator_dir, out, photos, encoders)
    assert "rank 0: 3 samples of 3 prompts to make" in caplog.text  # one job per image, keyed by it
    keys = ["a", "c", "sub/b"]  # sorted paths without suffix
    rows = [json.loads(line) for line in (out / "scores" / "per_image.jsonl").read_text().splitlines()]
    assert [row["key"] for row in rows] == keys
    pipe = UniLIPPipeline.from_pretrained(generator_dir)
    preset = MLLMPreset(**read_meta(generator_dir)["mllm"])
    captioner = build_captioner(preset, pipe.conditioner.tokenizer, pipe.conditioner.text_tokenizer, max_new_tokens=6)
    source_files = {"a": photos / "a.jpg", "sub/b": photos / "sub" / "b.png", "c": photos / "c.jpg"}
    for index, key in enumerate(keys):
        caption = (out / "captions" / f"{key}.txt").read_text().strip()
        source = Image.open(source_files[key]).convert("RGB")
        pixels = torch.from_numpy(np.asarray(source).copy()).permute(2, 0, 1).float()[None] / 255
        assert captioner.caption(pixels) == [caption]  # the MLLM's greedy caption of the image
        regenerated = Image.open(out / "images" / f"{key}.png").convert("RGB")
        expected = pipe([caption], seed=index, size=SIZE, num_inference_steps=2)[0]  # seed 0 + image index
        difference = np.abs(np.asarray(regenerated).astype(int) - (expected.permute(1, 2, 0).numpy() * 255).round())
        assert difference.max() <= 1, key
        for name, (_, theirs) in encoders.items():  # transformers' processor and model, cosine by hand
            a, b = theirs([source])[0].numpy(), theirs([regenerated])[0].numpy()
            cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            assert rows[index][name] == pytest.approx(cosine, abs=5e-3), (key, name)
        assert rows[index]["caption"] == caption
    scores = results["scores"]
    means = {name: np.mean([row[name] for row in rows]) for name in encoders}
    assert scores["encoders"] == pytest.approx(means) and scores["images"] == 3
    assert scores["overall"] == pytest.approx(np.mean(list(means.values())))
    summary = (out / "summary.md").read_text()
    assert "| overall |" in summary and "cosine of pooled features" in summary
    assert (out / "scores" / "per_image.md").read_text().count("\n") == 2 + 3

    # a rerun captions, samples and scores nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "captions" / "a.txt", out / "images" / "a.png")}
    again = run(generator_dir, out, photos, encoders)
    assert again["scores"] == scores and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # captions made with other settings are refused, in one line, before anything is written
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"^error: .*another captioner or settings \(prompt\)"):
        run(generator_dir, out, photos, encoders, "benchmark.prompt=Describe it briefly.")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_mistakes_are_one_line(generator_dir, encoders, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: prompts=.* holds no images"):
        run(generator_dir, tmp_path / "out", tmp_path / "empty", encoders)
    with pytest.raises(SystemExit, match=r"^error: prompts=.* does not exist"):
        run(generator_dir, tmp_path / "out", tmp_path / "missing", encoders)
    assert not (tmp_path / "out").exists()


def test_scored_rows_are_kept_on_a_rerun_and_an_unreadable_photo_is_left_out(generator_dir, encoders, tmp_path):
    """collect scores only images that have no row yet (a row already written is the score, not recomputed),
    and only images that were regenerated: an unreadable photo has none and is listed, not scored."""
    photos = tmp_path / "photos"
    data.photo_files(photos, ["a.jpg", "b.jpg"], side=48)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    first = run(generator_dir, out, photos, encoders)["scores"]
    assert first["images"] == 2 and first["unreadable"] == [
        {"key": "broken", "reason": f"image {photos / 'broken.jpg'} unreadable"}
    ]
    assert not (out / "images" / "broken.png").exists()
    words = [len((out / "captions" / f"{key}.txt").read_text().split()) for key in ("a", "b")]
    assert first["caption_words"] == pytest.approx(sum(words) / 2)
    assert first["rule"] == (
        "per encoder: cosine of the pooled features of source and regenerated image, mean over images; overall: "
        "mean over encoders (UAE's Score_i2i.py)"
    )
    per_image = out / "scores" / "per_image.jsonl"
    rows = [json.loads(line) for line in per_image.read_text().splitlines()]
    rows[0]["clip"] = 0.25  # a value no encoder gave: kept only if the row is not scored again
    per_image.write_text("".join(json.dumps(row) + "\n" for row in rows) + json.dumps({"note": "no key"}) + "\n")
    again = run(generator_dir, out, photos, encoders)["scores"]
    assert again["encoders"]["clip"] == pytest.approx((0.25 + rows[1]["clip"]) / 2)
    assert again["encoders"]["dinov2"] == pytest.approx(first["encoders"]["dinov2"])
    assert again["images"] == 2
