"""The sampling manifest on its own: what counts as "the same inputs" and "the same generator", the record of
a generator's lineage, and the message that refuses a folder made otherwise (test_sampling.py runs it through
the sampler)."""

import hashlib
import json

import pytest

from unilip.models.generator import FORMAT
from unilip.pipelines.jobs import SampleJob
from unilip.pipelines.manifest import (
    MANIFEST,
    SamplingError,
    check_manifest,
    file_digest,
    generator_record,
    jobs_digest,
    write_json,
)


def test_file_digest_is_sha256_of_the_whole_file_read_in_chunks(tmp_path):
    path = tmp_path / "weights"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert file_digest(path) == file_digest(path, chunk=7) == hashlib.sha256(data).hexdigest()


def _job(**changes) -> SampleJob:
    fields = {"key": "0", "prompt": "a cat", "seed": 1, "outputs": ("0.png",)}
    return SampleJob(**{**fields, **changes})


def test_the_inputs_digest_sees_prompts_and_source_names_not_source_folders():
    base = jobs_digest([_job(source="/data/a/photo.jpg")])
    assert jobs_digest([_job(source="/moved/elsewhere/photo.jpg")]) == base  # folders may move
    assert jobs_digest([_job(source="/data/a/other.jpg")]) != base
    assert jobs_digest([_job()]) != base  # an edit is not a text-to-image job
    assert jobs_digest([_job(source="/data/a/photo.jpg", prompt="a dog")]) != base
    assert jobs_digest([_job(source="/data/a/photo.jpg", keep_aspect=True)]) != base
    # keep_aspect off is left out, so a folder made before the option existed resumes: the digest of the
    # record without it, keys sorted (the order dataclass fields are declared in does not matter)
    record = {"key": "0", "prompt": "a cat", "seed": 1, "outputs": ["0.png"], "samples": 1, "source": "photo.jpg",
              "grid": False, "extra_files": []}  # fmt: skip
    assert base == hashlib.sha256(json.dumps([record], sort_keys=True).encode()).hexdigest()


def _generator(directory, **meta):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, **meta}))
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def test_generator_record_holds_what_decides_the_images_and_the_lineage_beside(tmp_path):
    meta = {
        "latents": {"kind": "unilip", "scale": 4.5},
        "stage": 3,
        "init_from": "/runs/a/stage2",
        "tokenizer": {"source": "/runs/tok"},
        "mllm": {"weights": "OpenGVLab/InternVL3-1B-hf"},
        "dit": {"weights": "/sana"},
    }
    directory = _generator(tmp_path / "generator", **meta)
    model, lineage = generator_record(directory)
    assert model == {"weights_sha256": hashlib.sha256(b"weights").hexdigest(), "latents": meta["latents"]}
    assert lineage == {
        "generator": str(directory.resolve()),
        "stage": 3,
        "init_from": "/runs/a/stage2",
        "tokenizer": "/runs/tok",
        "mllm_weights": "OpenGVLab/InternVL3-1B-hf",
        "dit_weights": "/sana",
        "tokenizer_overridden": False,
        "mllm_weights_overridden": False,
    }
    _, overridden = generator_record(directory, tokenizer="/other/tok", mllm_weights="/other/mllm")
    assert (overridden["tokenizer"], overridden["mllm_weights"]) == ("/other/tok", "/other/mllm")
    assert overridden["tokenizer_overridden"] and overridden["mllm_weights_overridden"]
    _, bare = generator_record(_generator(tmp_path / "bare"))  # a record without lineage: None, not an error
    assert bare["mllm_weights"] is bare["dit_weights"] is bare["tokenizer"] is None
    (directory / "model.safetensors").unlink()
    with pytest.raises(SamplingError, match=r"has no model.safetensors; give a saved generator \(<run>/generator\)"):
        generator_record(directory)


def test_a_folder_made_otherwise_is_refused_naming_up_to_four_differences(tmp_path):
    assert check_manifest(tmp_path, {"a": 1}) is None  # nothing there yet
    old = {"sampler": {"steps": 20, "cfg": 4.5, "size": 448, "scheduler": "dpm", "shift": 3.0}, "inputs": "x" * 64}
    write_json(tmp_path / MANIFEST, {"identity": old, "runs": []})
    assert check_manifest(tmp_path, old) == {"identity": old, "runs": []}
    new = {"sampler": {"steps": 30, "cfg": 5.0, "size": 512, "scheduler": "euler", "shift": 1.0}, "inputs": "y" * 64}
    with pytest.raises(SamplingError) as refused:
        check_manifest(tmp_path, new)
    message = str(refused.value)
    assert message == (
        f'{tmp_path} holds images made with other settings (inputs: "{"x" * 36}... -> "{"y" * 36}...; '
        'sampler.cfg: 4.5 -> 5.0; sampler.scheduler: "dpm" -> "euler"; sampler.shift: 3.0 -> 1.0); '
        "use another output directory, or delete it to start over"
    )
    # a key only one side has is a difference too (a setting added or removed), also nested
    with pytest.raises(SamplingError, match=r"\(model: null -> \{\"latents\": 1\}\)"):
        check_manifest(tmp_path, {**old, "model": {"latents": 1}})
    with pytest.raises(SamplingError, match=r"\(sampler.steps: 20 -> null\)"):
        check_manifest(tmp_path, {**old, "sampler": {k: v for k, v in old["sampler"].items() if k != "steps"}})
    write_json(tmp_path / MANIFEST, {"runs": []})  # no identity recorded: everything differs
    with pytest.raises(SamplingError, match=r"\(inputs: null -> "):
        check_manifest(tmp_path, old)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(SamplingError, match=rf"{MANIFEST} is not valid JSON \(.*\); move it away or use another out="):
        check_manifest(tmp_path, old)


def test_short_values_are_shown_whole_up_to_40_characters(tmp_path):
    write_json(tmp_path / MANIFEST, {"identity": {"a": "p" * 38, "b": "q" * 39}})  # 40 and 41 characters in JSON
    with pytest.raises(SamplingError) as refused:
        check_manifest(tmp_path, {"a": "r" * 38, "b": "s" * 39})
    assert f'a: "{"p" * 38}" -> "{"r" * 38}"; b: "{"q" * 36}... -> "{"s" * 36}...' in str(refused.value)


def test_write_json_makes_missing_folders_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / MANIFEST
    write_json(path, {"k": [1, 2]})
    assert path.read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}'  # indented: a person reads it
    assert [p.name for p in path.parent.iterdir()] == [MANIFEST]
