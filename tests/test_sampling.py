"""Sampling a prompt file (the generate CLI's `prompts` mode): seeds, resume, manifest, shards, refusals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.sampling_helpers import image_array, photo_files, save_tiny_generator
from unilip.pipelines.generate import main as generate_main
from unilip.pipelines.generate import read_prompt_file
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import shard, tile

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "56", "--steps", "3"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


def test_shards_hold_every_item_once_for_any_number_of_ranks():
    items = list(range(23))
    for world in (1, 2, 3, 5, 8, 30):
        parts = [shard(items, rank, world) for rank in range(world)]
        flat = [item for part in parts for item in part]
        assert sorted(flat) == items and len(flat) == len(set(flat))  # no gap, no duplicate
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red cube\n\n  a blue ball  \n")
    jobs = read_prompt_file(txt, images_per_prompt=2, seed=10)
    assert [(j.key, j.prompt, j.seed, j.outputs) for j in jobs] == [
        ("00000", "a red cube", 10, ("00000_0.png", "00000_1.png")),
        ("00001", "a blue ball", 11, ("00001_0.png", "00001_1.png")),
    ]
    jsonl = tmp_path / "edits" / "p.jsonl"
    jsonl.parent.mkdir()
    lines = [{"prompt": "make it blue", "image": "photo.jpg", "key": "cat"}, {"prompt": "a tree", "seed": 99}]
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = read_prompt_file(jsonl, seed=0)
    assert (first.key, first.source, first.seed, first.outputs) == (
        "cat",
        str(jsonl.parent / "photo.jpg"),
        0,
        ("cat.png",),
    )
    assert (second.key, second.source, second.seed) == ("00001", None, 99)
    for bad, message in [
        ('{"prompt": "x"}\nnot json\n', r"p.jsonl:2: not a JSON object"),
        ('{"text": "x"}\n', r'p.jsonl:1: each line needs a non-empty "prompt"'),
        ('{"prompt": "x", "key": "a"}\n{"prompt": "y", "key": "a"}\n', "appears twice"),
        ('{"prompt": "x", "key": "../up"}\n', "plain file name"),
        ('{"prompt": "x"}\n{"prompt": "y", "seed": "five"}\n', r'p.jsonl:2: "seed" must be a whole number.*"five"'),
        ('{"prompt": "x", "seed": 5.7}\n', r'p.jsonl:1: "seed" must be a whole number.*got 5.7$'),
        ('{"prompt": "x", "seed": true}\n', r'p.jsonl:1: "seed" must be a whole number'),
        ('{"prompt": "x", "seed": -1}\n', r'p.jsonl:1: "seed" must be a whole number'),
        ('{"prompt": "x", "image": 3}\n', r'p.jsonl:1: "image" must be the path of an image file, got 3'),
        ('{"prompt": "x", "key": null}\n', r'p.jsonl:1: "key" must be a string'),
    ]:
        jsonl.write_text(bad)
        with pytest.raises(SamplingError, match=message):
            read_prompt_file(jsonl)
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(SamplingError, match=r"use a \.txt"):
        read_prompt_file(tmp_path / "p.csv")


def test_prompt_file_images_follow_the_seed_rule_and_the_manifest_records_the_settings(generator_dir, tmp_path):
    from unilip.pipelines import UniLIPPipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na long prompt about a small blue ball on green grass in the morning\na tree\n")
    out = tmp_path / "out"
    generate_main(["prompts", "--generator", str(generator_dir), "--prompts", str(prompts), "--out", str(out),
                   "--seed", "5", "--batch-size", "2", "--guidance-scale", "3.0", *FAST])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "manifest.json"]
    pipe = UniLIPPipeline.from_pretrained(generator_dir)
    for index, prompt in enumerate(prompts.read_text().splitlines()):
        alone = pipe([prompt], seed=5 + index, size=56, num_inference_steps=3, guidance_scale=3.0)
        expected = (alone[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
        assert np.abs(image_array(out / f"{index:05d}.png") - expected).max() <= 1  # seed + i, whatever the batch
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["sampler"] == {
        "guidance_scale": 3.0, "steps": 3, "scheduler": "dpm", "size": 56, "seed": 5, "dtype": "float32"
    }  # fmt: skip
    weights = generator_dir / "model.safetensors"
    import hashlib

    assert manifest["identity"]["model"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["generator"]["generator"] == str(generator_dir.resolve()) and manifest["generator"]["stage"] == 3
    assert manifest["generator"]["tokenizer"] == str(generator_dir.parent / "tokenizer")
    assert "seed + i" in manifest["seed_rule"] and manifest["complete"] is True
    assert manifest["runs"][0]["ranks"][0]["generated"] == ["00000.png", "00001.png", "00002.png"]
    assert manifest["runs"][0]["ranks"][0]["pipeline"]["flow_shift"] == pipe.flow_shift


def test_a_rerun_keeps_what_exists_and_other_settings_are_refused(generator_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na tree\n")
    out = tmp_path / "out"
    args = ["prompts", "--generator", str(generator_dir), "--prompts", str(prompts), "--out", str(out), *FAST]
    generate_main(args)
    (out / "00001.png").unlink()
    kept = (out / "00000.png").stat().st_mtime_ns
    generate_main(args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][1]["ranks"][0]["generated"] == ["00001.png"]  # only what was missing
    assert manifest["runs"][1]["ranks"][0]["already_done"] == 1 and (out / "00000.png").stat().st_mtime_ns == kept
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit, match=r"^error: .*other settings \(sampler.steps: 3 -> 4"):
        generate_main([*args[:-2], "--steps", "4"])
    prompts.write_text("a red cube\na green tree\n")
    with pytest.raises(SystemExit, match=r"^error: .*other settings \(inputs:"):
        generate_main(args)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # a refused run changes nothing


def test_edits_from_a_prompt_file_and_an_unreadable_source_is_skipped(generator_dir, tmp_path):
    photo_files(tmp_path, ["cat.jpg"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    lines = [
        {"prompt": "make it blue", "image": "cat.jpg", "key": "cat"},
        {"prompt": "make it red", "image": "broken.jpg", "key": "broken"},
        {"prompt": "a tree", "key": "tree"},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    incomplete = (
        rf"^error: 1 of 3 prompts have no output \(first: broken: source image .*broken.jpg.*{out}/manifest.json"
    )
    with pytest.raises(SystemExit, match=incomplete):  # the others are written, but the run is not a success
        generate_main(["prompts", "--generator", str(generator_dir), "--prompts", str(prompts), "--out", str(out),
                       "--batch-size", "3", *FAST])  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["cat.png", "tree.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    (skipped,) = manifest["runs"][0]["ranks"][0]["skipped"]
    assert skipped["key"] == "broken" and "broken.jpg" in skipped["reason"] and manifest["complete"] is False
    # the same prompt file and images in another folder are the same inputs: the run resumes, makes nothing new
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("p.jsonl", "cat.jpg", "broken.jpg"):
        (tmp_path / name).rename(moved / name)
    with pytest.raises(SystemExit, match=incomplete):
        generate_main(["prompts", "--generator", str(generator_dir), "--prompts", str(moved / "p.jsonl"),
                       "--out", str(out), "--batch-size", "3", *FAST])  # fmt: skip
    rerun = json.loads((out / "manifest.json").read_text())["runs"][1]["ranks"][0]
    assert rerun["generated"] == [] and rerun["skipped"][0]["key"] == "broken"


@pytest.mark.slow  # a CLI start-up (~15-30 s here); test_edits_from_a_prompt_file... checks the same in-process
def test_a_prompt_whose_source_image_is_missing_fails_the_command_after_the_others_are_made(generator_dir, tmp_path):
    """The real CLI: a missing source image must not end in exit code 0 with an output missing. Every other image
    is written (a long run never dies on one bad sample), then one error line says how many prompts have no
    output and names the manifest that lists them."""
    photo_files(tmp_path, ["cat.jpg"])
    lines = [
        {"prompt": "make it blue", "image": "cat.jpg", "key": "cat"},
        {"prompt": "make it red", "image": "gone.jpg"},
        {"prompt": "a tree", "key": "tree"},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "unilip.pipelines.generate", "prompts", "--generator", str(generator_dir),
               "--prompts", str(prompts), "--out", str(out), "--device", "cpu", *FAST]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("UNILIP_TRACEBACK", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 3 prompts have no output (first: 00001: "), errors
    assert "gone.jpg" in errors[0] and str(out / "manifest.json") in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "manifest.json", "tree.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["runs"][0]["ranks"][0]["skipped"][0]["key"] == "00001"


def test_grid_tiles_four_samples_row_major():
    parts = [np.full((2, 3, 3), value, dtype=np.uint8) for value in (0, 1, 2, 3)]
    grid = tile(parts)
    assert grid.shape == (4, 6, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 1 and grid[2, 0, 0] == 2 and grid[2, 3, 0] == 3


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def test_a_killed_run_restarted_makes_each_image_once(generator_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}: a {'red' if i % 2 else 'blue'} object number {i}\n" for i in range(60)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "unilip.pipelines.generate", "prompts", "--generator", str(generator_dir),
               "--prompts", str(prompts), "--out", str(out), "--size", "112", "--steps", "8",
               "--batch-size", "1"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300

    def finished():  # pathlib's glob also lists the hidden partial files (.tmp-*) a write leaves until renamed
        return [p for p in out.glob("*.png") if not p.name.startswith(".")]

    while len(finished()) < 5:
        assert process.poll() is None and time.monotonic() < deadline, "the first run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished()}
    assert 5 <= len(first) < 60, f"{len(first)} images before the kill"
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:05d}.png" for i in range(60)] + ["manifest.json"])  # nothing partial left
    assert all((out / n).stat().st_ino == i and (out / n).stat().st_mtime_ns == t for n, (i, t) in first.items())
    manifest = json.loads((out / "manifest.json").read_text())
    generated = [name for run in manifest["runs"] for rank in run["ranks"] for name in rank["generated"]]
    assert sorted(generated) == sorted(set(f"{i:05d}.png" for i in range(60)) - set(first))  # each once
    assert manifest["complete"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_prompts_with_no_duplicate_and_no_gap(generator_dir, tmp_path):
    from tests.sampling_helpers import geneval_prompts

    prompts = geneval_prompts(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "unilip.benchmarks", "geneval", f"generator={generator_dir}", f"out={out}",
               f"prompts={prompts}", "sampler.size=56", "sampler.steps=2", "batch_size=3", "timeout_s=300"]  # fmt: skip
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert all(p.returncode == 0 for p in processes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    (run,) = manifest["runs"]
    assert run["world_size"] == 2
    by_rank = {rank["rank"]: rank["generated"] for rank in run["ranks"]}
    every = [f"images/{i:05d}/samples/{k:04d}.png" for i in range(3) for k in range(4)]
    assert sorted(by_rank[0] + by_rank[1]) == sorted(every) and not set(by_rank[0]) & set(by_rank[1])
    assert all(name.startswith(("images/00000/", "images/00002/")) for name in by_rank[0])  # prompts 0, 2
    assert all(name.startswith("images/00001/") for name in by_rank[1])  # prompt 1
    assert json.loads((out / "results.json").read_text())["benchmark"] == "geneval"  # rank 0 reported
