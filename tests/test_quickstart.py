"""CI runs what a newcomer runs: `.ci/quickstart` reads the README's marked quick-start blocks and runs exactly
those commands on a fresh copy. These tests keep the markers and the extractor honest (a README edit that
loses a marker, or moves a command out of its block, fails here, in seconds)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _quickstart():
    loader = importlib.machinery.SourceFileLoader("ci_quickstart", str(REPO / ".ci" / "quickstart"))
    spec = importlib.util.spec_from_loader("ci_quickstart", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_ci_runs_the_readmes_quick_start_commands_in_order():
    commands = [command.split("#")[0].split() for _, command in _quickstart().planned()]
    tokenizer_eval = ["python", "eval.py", "ckpt=runs/quickstart/tokenizer/stage2", "trainer=cpu"]
    generation = ["python", "train.py", "task=generate", "experiment=generate/quickstart"]
    assert commands[:6] == [
        ["python", "train.py", "stage=1", "experiment=quickstart"],
        ["python", "train.py", "stage=2", "experiment=quickstart"],
        tokenizer_eval,
        [*generation, "stage=1"],
        [*generation, "stage=2"],
        [*generation, "stage=3"],
    ]
    (cli,) = commands[6:]  # the generate CLI on the generation quick start's result
    assert cli[:4] == ["python", "-m", "unilip.pipelines.generate", "t2i"]
    assert cli[cli.index("--generator") + 1] == "runs/quickstart/generate/stage3/generator"


def test_the_extractor_reads_marked_blocks_joins_continuations_and_refuses_a_broken_marker():
    quickstart = _quickstart()
    readme = "\n".join(
        [
            "<!-- quickstart: a -->",
            "```bash",
            "# a comment line",
            "python x.py one=1   # why",
            "",
            "python y.py \\",
            "    --flag 2",
            "```",
            "```bash",
            "python not_marked.py",
            "```",
        ]
    )
    assert quickstart.quickstart_blocks(readme) == {"a": ["python x.py one=1   # why", "python y.py --flag 2"]}
    with pytest.raises(ValueError, match="must sit right above a ``` fence"):
        quickstart.quickstart_blocks("<!-- quickstart: a -->\n\n```bash\npython x.py\n```")
    with pytest.raises(ValueError, match="marked twice"):
        quickstart.quickstart_blocks(readme + "\n" + readme)
