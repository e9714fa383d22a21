"""The harness of the fault-injection tests (tests/test_user_errors*.py): the inputs the cases break, the
commands, the case registry and the check every case must pass through the real command-line tools.

Every case is a user's mistake (a wrong path, a broken file, a config that cannot work, a run that
would overwrite another) and must end with: a non-zero exit code, exactly one `error:` line on
stderr that names the problem, no traceback, and every file and directory exactly as before (hashed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    root: Path  # everything the case reads or writes lives here (the command also runs here)
    photos: Path  # the bundled photo shards (paths.data_dir), read-only
    trained: Callable[[], Path] = lambda: Path()  # a finished tiny run's `runs/` folder (built once, on demand)

    def path(self, name: str) -> Path:
        return self.root / name

    def trained_run(self) -> Path:
        """A copy of the tiny trained run under this case's `runs/`; its folder (default/tokenizer/stage1)."""
        shutil.copytree(self.trained(), self.path("runs"), dirs_exist_ok=True)
        return self.path("runs/default/tokenizer/stage1")


def tree(*roots: Path) -> dict[str, str]:
    """Every file (its sha256) and every directory under `roots`."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = str(path)
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


# ------------------------------------------------------------------------------- inputs the cases break
def saved_tokenizer(case: Case, name: str = "tokenizer") -> Path:
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.manual_seed(0)
    UniLIPTokenizer(tokenizer_preset("tiny")).save_pretrained(case.path(name), training={"stage": 1})
    return case.path(name)


def encoder_tokenizer(case: Case, preset: str, name: str = "tokenizer") -> Path:
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.manual_seed(0)
    UniLIPTokenizer(tokenizer_preset(preset)).save_pretrained(case.path(name), training={"stage": 1})
    return case.path(name)


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def checkpoint_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "unilip": {"task": "tokenizer"}}, path)
    return path


def text_file(path: Path, text: str = "these are notes, not a checkpoint\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def internvl_base(case: Case, name: str, **options) -> Path:
    from tests.test_internvl import tiny_internvl
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    hidden = options.pop("llm_hidden_size", None)
    tokenizer = UniLIPTokenizer(tokenizer_preset("tiny"))
    if hidden is not None:
        tokenizer.config.llm_hidden_size = hidden
    tiny_internvl(tokenizer, **options).save_pretrained(case.path(name))
    return case.path(name)


# ------------------------------------------------------------------------------- the commands
def train(case: Case, *overrides: str) -> list[str]:
    return [
        str(REPO / "train.py"),
        f"paths.runs_dir={case.path('runs')}",
        f"paths.data_dir={case.photos}",
        "trainer=cpu",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]


def evaluate(case: Case, *overrides: str) -> list[str]:
    return [
        str(REPO / "eval.py"),
        f"paths.runs_dir={case.path('runs')}",
        f"paths.data_dir={case.photos}",
        "trainer=cpu",
        "data.val_num_workers=0",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]


# A run of two steps: what the cases that train (before the fix, or to resume) need.
SHORT = [
    "stages.stage1.max_steps=2",
    "stages.stage1.image_size=56",
    "data.batch_size=2",
    "data.train_batches_per_epoch=2",
    "loss.perceptual_weight=0",
]


def export(*args: str) -> list[str]:
    return ["-m", "unilip.export", *args]


def make_shards(*args: str) -> list[str]:
    return ["-m", "unilip.data.make_shards", *args]


def generate(*args: str) -> list[str]:
    return ["-m", "unilip.pipelines.generate", *args]


# ------------------------------------------------------------------------------- the cases
# name -> (set-up returning the command line, a fragment of the one error line)
CASES: dict[str, tuple[Callable[[Case], list[str]], str]] = {}


def case(name: str, message: str):
    def register(setup: Callable[[Case], list[str]]) -> Callable[[Case], list[str]]:
        CASES[name] = (setup, message)
        return setup

    return register


# The default suite runs one case of each kind (~6-15 s each: a CLI start-up); these others, which take the
# same paths with other inputs, run with `pytest -m slow`.
SLOW = {
    "train: an empty data folder",
    "train: a folder given as a shard",
    "train: init_from a saved tokenizer with truncated weights",
    "train: init_from a truncated checkpoint",
    "train: resume from a truncated checkpoint",
    "train: resume from a run directory",
    "make_shards: an output path that is an existing file",
    "eval: a ckpt that does not exist",
    "eval: a text file named .ckpt",
    "eval: a preset that does not exist",
    "export: a base whose projector does not fit",
    "export: a released .pth with the wrong preset",
    "export: an output directory that is not empty",
    "export: an InternViT tokenizer without its InternVL base",
    "train: encoder weights of another encoder",
    "make_shards: an input that does not exist",
    "generate: a prompt file whose seed is a fraction",
    "train: a latent cache made with another tokenizer",  # tests/test_latent_cache.py checks the refusal in-process
    # resume (~15 s each: the training imports): another model by default, the others read the same comparison
    # (tests/test_stops_and_resumes.py checks it in-process). Config values are refused before those imports (~2 s).
    "train: resume with another batch size",
    "train: resume at another image size",
    "train: resume with another loss",
    "train: resume with another optimiser",
    "train: resume a stage-1 checkpoint as stage 2",
    "train: resume a tokenizer checkpoint as a generation run",
}


# Cases whose error line must end with a path under the case's folder.
NAMED_PATHS = {
    "train: resume=auto from a truncated last.ckpt": "runs/default/tokenizer/stage1/checkpoints/step0000100.ckpt"
}


@pytest.fixture(scope="module")
def trained_runs(photos_dir, tmp_path_factory) -> Path:
    """A finished two-step run (`runs/default/tokenizer/stage1`), made by the CLI the cases use."""
    root = tmp_path_factory.mktemp("trained")
    c = Case(root=root, photos=photos_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = run_tree([sys.executable, *train(c, *SHORT)], cwd=root, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs"


def params(module: str) -> list:
    """The cases a test module registered, those in SLOW marked slow."""
    names = [name for name, (setup, _) in CASES.items() if setup.__module__ == module]
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


def check(name: str, photos_dir: Path, tmp_path: Path, request) -> None:
    """Run case `name` through its CLI in `tmp_path` and assert what every user's mistake must end with."""
    setup, message = CASES[name]
    c = Case(root=tmp_path, photos=photos_dir, trained=lambda: request.getfixturevalue("trained_runs"))
    command = [sys.executable, *setup(c)]
    before = tree(tmp_path, photos_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    for variable in ("UNILIP_TRACEBACK", "HYDRA_FULL_ERROR"):
        env.pop(variable, None)
    result = run_tree(command, cwd=tmp_path, env=env, timeout=300)
    report = f"{name}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0, report
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], report
    if name in NAMED_PATHS:  # the path the line must name, which only exists under this test's folder
        assert errors[0].endswith(str(c.path(NAMED_PATHS[name]))), report
    assert "Traceback" not in result.stderr + result.stdout, report
    assert tree(tmp_path, photos_dir) == before, report
