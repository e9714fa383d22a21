"""Parity with the authors' code, at tiny size, when a checkout of it is at hand (skipped otherwise).

    UNILIP_REFERENCE=/path/to/UniLIP UNILIP_INTERNVL=/path/to/InternVL \\
    UNILIP_REFERENCE_PYTHON=/path/to/venv-with-their-pins/bin/python pytest tests/test_parity.py -m slow

The real-size numbers, and the deliberate differences these tolerances leave out, are in docs/parity.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REFERENCE, INTERNVL = os.environ.get("UNILIP_REFERENCE"), os.environ.get("UNILIP_INTERNVL")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REFERENCE and INTERNVL), reason="set UNILIP_REFERENCE and UNILIP_INTERNVL to checkouts"),
]
PARITY = Path(__file__).resolve().parents[1] / "parity"
TOLERANCE = 1e-5  # fp32


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, PARITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _args(work: Path) -> list[str]:
    python = os.environ.get("UNILIP_REFERENCE_PYTHON", sys.executable)
    return ["--reference", REFERENCE, "--internvl", INTERNVL, "--reference-python", python, "--work", str(work)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


def test_generation_matches_the_reference(work):
    report = _script("parity_generation").main([*_args(work), "--preset", "tiny"])
    for case in ("t2i", "edit"):
        result = report[case]
        assert result["token_ids_equal"]
        assert result["condition_max_abs_diff"] < TOLERANCE
        assert result["first_timestep"]["ours"] == result["first_timestep"]["theirs_dit_input"]
        same_table = result["with_their_bf16_position_table"]  # their bf16-loaded position table (docs/parity.md)
        assert same_table["velocity_max_abs_diff"] < TOLERANCE and same_table["step_max_abs_diff"] < TOLERANCE
        assert result["velocity_max_abs_diff"] < 1e-2 * result["velocity_max_abs"]


def test_tokenizer_matches_the_reference(work):
    report = _script("parity_tokenizer").main([*_args(work), "--preset", "tiny"])
    for size in ("224px", "448px", "256px"):
        assert report[size]["features"]["max_abs_diff"] < TOLERANCE
        assert report[size]["latent"]["max_abs_diff"] < TOLERANCE
    assert report["224px"]["reconstruction"]["max_abs_diff"] < TOLERANCE
    assert report["448px"]["reconstruction"]["max_abs_diff"] < TOLERANCE
    # 256 px: their Pad class resizes with align_corners=True, ours with False (docs/parity.md)
    assert report["256px"]["reconstruction"]["with_their_align_corners_resize"] < TOLERANCE
