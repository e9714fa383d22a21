"""`python -m unilip.data.prepare` on a user's mistakes, through the harness of tests/test_user_errors.py
(tests/user_errors.py): one `error:` line naming the problem and the fix, a non-zero exit, no traceback,
every file as it was."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import prepare_miniatures as mini
from tests.user_errors import REPO, Case, text_file, tree
from unilip.data.prepare.datasets import prepare

CASES = {}


def command(*args: str) -> list[str]:
    return ["-m", "unilip.data.prepare", *args]


def register(name: str, message: str):
    def wrap(setup):
        CASES[name] = (setup, message)
        return setup

    return wrap


@register("a download folder that does not exist", "no such folder (the gpt-image-edit download, from UCSC-VLAA")
def _(c):
    return command("gpt-image-edit", str(c.path("GPT-Image-Edit-1.5M")), str(c.path("out")))


@register("another dataset's download", "holds no gptedit.txt (or data.txt); is it the GPT-Image-Edit-1.5M download?")
def _(c):
    mini.sharegpt4o_download(c.path("ShareGPT-4o-Image"))
    return command("gpt-image-edit", str(c.path("ShareGPT-4o-Image")), str(c.path("out")))


@register("converted edit shards given as BLIP3o-Pretrain", "its samples hold input.jpg, output.jpg, txt; a blip3o")
def _(c):
    members = {"00000000.input.jpg": mini.image_bytes(0, fmt="JPEG"), "00000000.output.jpg": b"x", "00000000.txt": b"e"}
    mini.tar_of(c.path("GPT-Edit/000000.tar"), members)
    return command("blip3o-pretrain", str(c.path("GPT-Edit")), str(c.path("out")))


@register("an out folder holding another dataset's shards", "holds the output of `prepare sharegpt4o-t2i` (from")
def _(c):
    mini.sharegpt4o_download(c.path("ShareGPT-4o-Image"))
    prepare("sharegpt4o-t2i", c.path("ShareGPT-4o-Image"), c.path("shards"))
    return command("sharegpt4o-edit", str(c.path("ShareGPT-4o-Image")), str(c.path("shards")))


@register("an out folder holding other files", "is not empty and holds no output of `prepare imagenet`")
def _(c):
    mini.imagenet_hub_download(c.path("imagenet"))
    text_file(c.path("imagenet_val/notes.txt"))
    return command("imagenet", str(c.path("imagenet")), str(c.path("imagenet_val")))


@register("a folder that is no ImageNet download", "is not an ImageNet validation download: expected data/val_images")
def _(c):
    mini.blip3o_download(c.path("BLIP3o-60k"), shards=1)
    return command("imagenet", str(c.path("BLIP3o-60k")), str(c.path("imagenet_val")))


@register("an annotation JSON cut short", "omniedit_gpt.json: not a JSON file")
def _(c):
    mini.gpt_image_edit_download(c.path("dl"), records=2)
    annotation = c.path("dl/training_json/omniedit_gpt.json")
    annotation.write_text(annotation.read_text()[:50])
    return command("gpt-image-edit", str(c.path("dl")), str(c.path("out")))


# Each case is a CLI start-up (seconds); the default suite runs three kinds, `-m slow` all.
FAST = {
    "a download folder that does not exist",
    "another dataset's download",
    "an out folder holding another dataset's shards",
}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_a_prepare_mistake_is_one_error_line_and_changes_nothing(name, tmp_path):
    setup, message = CASES[name]
    c = Case(root=tmp_path, photos=tmp_path)
    cmd = [sys.executable, *setup(c)]
    before = tree(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("UNILIP_TRACEBACK", None)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    report = f"{name}\nstderr:\n{result.stderr[-4000:]}"
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0, report
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], report
    assert "Traceback" not in result.stderr + result.stdout, report
    assert tree(tmp_path) == before, report
