"""Users' mistakes with eval.py, the export, the generate CLI, make_shards, the latent cache and the benchmarks,
through the real CLIs, one subprocess per case (harness: tests/user_errors.py): one `error:` line, a non-zero
exit, no traceback, nothing on disk changed."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.user_errors import (
    Case,
    case,
    check,
    checkpoint_file,
    encoder_tokenizer,
    evaluate,
    export,
    generate,
    internvl_base,
    make_shards,
    params,
    saved_tokenizer,
    text_file,
    trained_runs,  # noqa: F401  (a fixture some cases use)
    truncated,
)


@case("eval: a batch size of 0", "batch_size=0: must be an integer >= 1")
def _(c):
    return evaluate(c, f"ckpt={c.path('nowhere')}", "batch_size=0")


@case("eval: a protocol that is a word", "protocol='big': must be an integer >= 1")
def _(c):
    return evaluate(c, f"ckpt={c.path('nowhere')}", "protocol=big")


@case("eval: no ckpt", "ckpt is required; pass ckpt=<value>")
def _(c):
    return evaluate(c)


@case("eval: a ckpt that does not exist", "does not exist; give a run directory")
def _(c):
    return evaluate(c, f"ckpt={c.path('nowhere')}")


@case("eval: a saved tokenizer with truncated weights", "is not a readable safetensors file")
def _(c):
    truncated(saved_tokenizer(c) / "model.safetensors")
    return evaluate(c, f"ckpt={c.path('tokenizer')}")


@case("eval: a text file named .ckpt", "is not a PyTorch checkpoint")
def _(c):
    return evaluate(c, f"ckpt={text_file(c.path('notes.ckpt'))}")


@case("eval: a preset that does not exist", "no tokenizer preset 'unilip_9b'")
def _(c):
    return evaluate(c, f"ckpt={checkpoint_file(c.path('1b_unilip.pth'))}", "preset=unilip_9b")


@case("eval: a folder given as the evaluation shards", "data.val_urls: ")
def _(c):
    return evaluate(c, f"ckpt={saved_tokenizer(c)}", f"data.val_urls={c.photos / 'photos'}")


@case("export: a base whose projector does not fit", "llm_hidden_size: 64 != 48")
def _(c):
    base = internvl_base(c, "base", llm_hidden_size=64)
    return export("--tokenizer", str(saved_tokenizer(c)), "--base", str(base), "--out", str(c.path("out")))


@case("export: a base with another projector activation", "projector_hidden_act='relu', the tokenizer's is 'gelu'")
def _(c):
    base = internvl_base(c, "base", projector_hidden_act="relu")
    return export("--tokenizer", str(saved_tokenizer(c)), "--base", str(base), "--out", str(c.path("out")))


@case("export: a base that is not an InternVL checkpoint", "is not a transformers InternVL checkpoint")
def _(c):
    tokenizer = saved_tokenizer(c)
    return export("--tokenizer", str(tokenizer), "--base", str(tokenizer), "--out", str(c.path("out")))


@case("export: an original-format InternVL base with a truncated weight file", "is not a readable safetensors file")
def _(c):
    from tests.test_internvl_original import write_original_base
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    base = write_original_base(UniLIPTokenizer(tokenizer_preset("tiny")), c.path("InternVL3-1B"))
    truncated(base / "model.safetensors", keep=0.9)
    return export("--tokenizer", str(saved_tokenizer(c)), "--base", str(base), "--out", str(c.path("out")))


@case("export: a released .pth with the wrong preset", "shape mismatches")
def _(c):
    from tests.test_internvl import to_released_layout
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.save(to_released_layout(UniLIPTokenizer(tokenizer_preset("tiny"))), c.path("tiny_unilip.pth"))
    base = internvl_base(c, "base")
    args = ["--tokenizer", str(c.path("tiny_unilip.pth")), "--preset", "unilip_1b", "--base", str(base)]
    return export(*args, "--out", str(c.path("out")))


@case("export: a DINOv2 base of another size", "does not fit the tokenizer preset (hidden_size: 48 != 32")
def _(c):
    from tests.test_encoder_export import home_checkpoint

    base, _ = home_checkpoint("dinov2_with_registers", c.path("base"), hidden_size=48)
    tokenizer = encoder_tokenizer(c, "tiny_dinov2")
    return export("--tokenizer", str(tokenizer), "--base", str(base), "--out", str(c.path("out")))


@case("export: an InternViT tokenizer without its InternVL base", "--base is required for an InternViT tokenizer")
def _(c):
    return export("--tokenizer", str(saved_tokenizer(c)), "--out", str(c.path("out")))


@case("export: an output directory that is not empty", "already exists and is not empty")
def _(c):
    text_file(c.path("out") / "README.md", "an earlier export\n")
    base = internvl_base(c, "base")
    return export("--tokenizer", str(saved_tokenizer(c)), "--base", str(base), "--out", str(c.path("out")))


@case("generate: a tokenizer folder given as the generator", "is not a UniLIP generator config")
def _(c):
    args = ["t2i", "--generator", str(saved_tokenizer(c)), "--prompt", "a cat", "--device", "cpu"]
    return generate(*args, "--out", str(c.path("cat.png")))


def prompt_file(case: Case, *lines: dict) -> list[str]:
    """`generate prompts` on a .jsonl file of `lines`; the file is read before the generator is looked at."""
    text_file(case.path("prompts.jsonl"), "".join(json.dumps(line) + "\n" for line in lines))
    out = ["--out", str(case.path("samples")), "--device", "cpu"]
    return generate(
        "prompts", "--generator", str(case.path("generator")), "--prompts", str(case.path("prompts.jsonl")), *out
    )


@case("generate: a prompt file whose seed is a word", 'prompts.jsonl:2: "seed" must be a whole number')
def _(c):
    return prompt_file(c, {"prompt": "a cat"}, {"prompt": "a dog", "seed": "five"})


@case(
    "generate: a prompt file whose seed is a fraction",
    'prompts.jsonl:1: "seed" must be a whole number in [0, 2^64), got 5.7',
)
def _(c):
    return prompt_file(c, {"prompt": "a cat", "seed": 5.7})


@case("make_shards: an input that does not exist", "not a directory or a .jsonl file")
def _(c):
    return make_shards(str(c.path("photos")), str(c.path("shards")))


@case("make_shards: a JSONL file with a broken line", "records.jsonl, line 2: not valid JSON")
def _(c):
    Image.new("RGB", (8, 8)).save(c.path("a.png"))
    text_file(c.path("records.jsonl"), json.dumps({"image": "a.png", "caption": "a"}) + "\n{'image': 'b.png'}\n")
    return make_shards(str(c.path("records.jsonl")), str(c.path("shards")))


@case("make_shards: an output directory that already holds shards", "already holds 1 shard-*.tar shards")
def _(c):
    c.path("images").mkdir()
    Image.new("RGB", (8, 8)).save(c.path("images/a.png"))
    text_file(c.path("shards/shard-000000.tar"), "an earlier shard set\n")
    return make_shards(str(c.path("images")), str(c.path("shards")))


@case("make_shards: an output path that is an existing file", "shards.tar is a file, not a folder; give a new")
def _(c):
    c.path("images").mkdir()
    Image.new("RGB", (8, 8)).save(c.path("images/a.png"))
    text_file(c.path("shards.tar"), "a file the user meant to keep\n")
    return make_shards(str(c.path("images")), str(c.path("shards.tar")))


@case("make_shards: a folder in which no image can be read", "none of the 2 samples could be read")
def _(c):
    text_file(c.path("images/a.jpg"), "not a JPEG")
    text_file(c.path("images/b.png"), "not a PNG")
    return make_shards(str(c.path("images")), str(c.path("shards")))


@case("cache_latents: no cache directory", "latent_cache.dir=<directory> is required")
def _(c):
    return [
        "-m",
        "unilip.tasks.generation.cache_latents",
        "experiment=generate/quickstart",
        f"paths.data_dir={c.photos}",
    ]


@case("benchmarks: Unified-Bench on a folder without images", "holds no images")
def _(c):
    text_file(c.path("pictures/notes.txt"))
    out = f"out={c.path('bench')}"
    return ["-m", "unilip.benchmarks", "unified", f"generator={c.path('gen')}", out, f"prompts={c.path('pictures')}"]


@pytest.mark.parametrize("name", params(__name__))
def test_a_tool_mistake_is_one_error_line_and_changes_nothing(name, photos_dir, tmp_path, request):
    check(name, photos_dir, tmp_path, request)
