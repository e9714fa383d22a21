"""The Dockerfile (no Docker engine here): it is well-formed and refers to what exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _instructions():
    text = (REPO / "docker" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split()[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_builds_on_an_official_cuda_pytorch_image_and_runs_train():
    instructions = _instructions()
    args = {value.split("=")[0]: value.split("=", 1)[1] for kind, value in instructions if kind == "ARG"}
    base = next(value for kind, value in instructions if kind == "FROM")
    base = args.get(base.strip("${}"), base)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)", base), base
    assert any(kind == "RUN" and "pip install" in value for kind, value in instructions)
    entry = next(value for kind, value in instructions if kind == "ENTRYPOINT")
    assert "train.py" in entry


def test_dockerfile_copies_only_files_that_exist():
    for kind, value in _instructions():
        if kind == "COPY":
            *sources, _ = value.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing"
