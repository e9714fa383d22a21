"""Fault injection through the real command-line tools, one subprocess per case, as a user would meet it.

Every case is a user's mistake (a wrong path, a broken file, a config that cannot work, a run that
would overwrite another) and must end with: a non-zero exit code, exactly one `error:` line on
stderr that names the problem, no traceback, and every file and directory exactly as before (hashed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

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


@case("train: a stage that does not exist", "stage=3 is not a tokenizer stage; use stage=1")
def _(c):
    return train(c, "stage=3")


@case("train: a stage that is not a number", "stage='two' is not a tokenizer stage")
def _(c):
    return train(c, "stage=two")


@case("train: an option that does not exist", "Could not find 'experiment/quickstrat'")
def _(c):
    return train(c, "experiment=quickstrat")


@case("train: a run directory that holds another run's checkpoints", "already holds checkpoints; pass resume=auto")
def _(c):
    run = c.path("runs/default/tokenizer/stage1")
    checkpoint_file(run / "checkpoints" / "last.ckpt")
    text_file(run / ".hydra" / "config.yaml", "stage: 1\noptim:\n  lr: 0.0001\n")
    text_file(run / ".hydra" / "overrides.yaml", "- stage=1\n")
    text_file(run / "train.log", "[the log of the run that made these checkpoints]\n")
    return train(c, "stage=1", "optim.lr=0.5")


@case("train: a data directory that does not exist", "data.train_sources[short_caption].urls: no shard matches")
def _(c):
    return train(c, "data=blip3o", f"paths.data_dir={c.path('nowhere')}")


@case("train: an empty data folder", "no shard matches")
def _(c):
    c.path("empty").mkdir()
    return train(c, f"data.train_sources.0.urls={c.path('empty')}/*.tar")


@case("train: a folder given as a shard", "is a directory, not a shard; give the shards in it")
def _(c):
    return train(c, f"data.train_sources.0.urls={c.photos / 'photos'}")


@case("train: init_from a saved tokenizer with truncated weights", "is not a readable safetensors file")
def _(c):
    truncated(saved_tokenizer(c) / "model.safetensors")
    return train(c, "stage=2", f"init_from={c.path('tokenizer')}")


@case("train: init_from a truncated checkpoint", "is not a PyTorch checkpoint")
def _(c):
    return train(c, "stage=2", f"init_from={truncated(checkpoint_file(c.path('run.ckpt')))}")


@case("train: init_from a text file named .ckpt", "is not a PyTorch checkpoint")
def _(c):
    return train(c, "stage=2", f"init_from={text_file(c.path('notes.ckpt'))}")


@case("train: resume from a truncated checkpoint", "is not a readable checkpoint (truncated")
def _(c):
    return train(c, f"resume={truncated(checkpoint_file(c.path('step.ckpt')))}")


@case("train: resume=auto from a truncated last.ckpt", "latest earlier one: resume=")
def _(c):
    checkpoints = c.path("runs/default/tokenizer/stage1/checkpoints")
    checkpoint_file(checkpoints / "step0000100.ckpt")
    truncated(checkpoint_file(checkpoints / "step0000200.ckpt"))  # killed while written: not the one to name
    truncated(checkpoint_file(checkpoints / "last.ckpt"))
    return train(c, "resume=auto")


@case("train: resume from a run directory", "is a directory that holds no checkpoint")
def _(c):
    checkpoint_file(c.path("runs/old/tokenizer/stage1/checkpoints/last.ckpt"))
    return train(c, f"resume={c.path('runs/old/tokenizer/stage1')}")


@case("train: the learning rate as a word", "optim.lr='fast': must be a number > 0")
def _(c):
    return train(c, *SHORT, "optim.lr=fast")


@case("train: a negative learning rate", "optim.lr=-0.0001: must be a number > 0")
def _(c):
    return train(c, *SHORT, "optim.lr=-1e-4")


@case("train: a learning rate that is not a number", "optim.lr=nan: must be a number > 0")
def _(c):
    return train(c, *SHORT, "optim.lr=nan")


# README's own example on the quick start, whose schedule ends at 1e-4
@case("train: a learning rate below where its schedule ends", "optim.lr=5e-05 is below optim.final_lr=0.0001")
def _(c):
    return train(c, "experiment=quickstart", *SHORT, "optim.lr=5e-5")


@case("train: an image size that is a word", "stages.stage1.image_size='big': must be an integer >= 1")
def _(c):
    return train(c, *SHORT, "stages.stage1.image_size=big")


@case("train: a checkpoint every 0 steps", "checkpoint_every=0: must be an integer >= 1")
def _(c):
    return train(c, *SHORT, "checkpoint_every=0")


@case("train: an EMA decay above 1", "optim.ema_decay=2: must be a number in [0, 1)")
def _(c):
    return train(c, *SHORT, "optim.ema_decay=2")


@case("train: a negative validation batch size", "data.val_batch_size=-1: must be an integer >= 1 or null")
def _(c):
    return train(c, *SHORT, "data.val_batch_size=-1")


@case("train: a negative number of steps", "stages.stage1.max_steps=-5: must be an integer >= 1")
def _(c):
    return train(c, *SHORT, "stages.stage1.max_steps=-5")


@case("train: zero devices", "trainer.devices=0: must be a count >= 1")
def _(c):
    return train(c, *SHORT, "trainer.devices=0")


@case("train: several mistakes, one line", "optim.lr=-1: must be a number > 0; checkpoint_every=0: must be")
def _(c):
    return train(c, *SHORT, "optim.lr=-1", "checkpoint_every=0")


@case("train: generation, a prompt dropout above 1", "module.cfg_dropout=1.5: must be a number in [0, 1]")
def _(c):
    short = ["stages.stage1.max_steps=2", "data.train_batches_per_epoch=2"]
    return train(c, "task=generate", "stage=1", "experiment=generate/quickstart", *short, "module.cfg_dropout=1.5")


@case("train: unified, a learning rate of 0", "stages.stage1.lr=0: must be a number > 0")
def _(c):
    return train(c, "task=unified", "stage=1", "experiment=unified/quickstart", "stages.stage1.lr=0")


@case("train: validation shards in which nothing can be read", "data.val_urls: no validation sample could be read")
def _(c):
    return train(c, *SHORT, f"data.val_urls={text_file(c.path('val-000000.tar'), 'not a tar')}")


# resume=auto with what a resumed run cannot change: refused before anything of the run is rewritten
# (.hydra/, config.yaml, logs/hparams.yaml, train.log, checkpoints)
@case("train: resume with another model", "model.config.encoder: internvit -> dinov2_with_registers")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "model=tiny_dinov2")


@case("train: resume with another batch size", "global batch (data.batch_size x processes): 2 (2 x 1) -> 4 (4 x 1)")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "data.batch_size=4")


@case("train: resume at another image size", "data.image_size: 56 -> 112")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "stages.stage1.image_size=112")


@case("train: resume with another loss", "loss.l2_weight: 1.0 -> 2")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "loss.l2_weight=2")


@case("train: resume with another optimiser", "optim.lr: 0.0001 -> 0.0002")
def _(c):
    c.trained_run()
    return train(c, *SHORT, "resume=auto", "optim.lr=2e-4")


@case("train: resume a stage-1 checkpoint as stage 2", "stage: 1 -> 2")
def _(c):
    run = c.trained_run()
    return train(c, *SHORT, "stage=2", f"resume={run / 'checkpoints' / 'last.ckpt'}")


@case("train: resume a tokenizer checkpoint as a generation run", "task: tokenizer -> generate")
def _(c):
    run = c.trained_run()
    return train(c, "task=generate", "experiment=generate/quickstart", f"resume={run / 'checkpoints' / 'last.ckpt'}")


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


@case("train: encoder weights of another encoder", "is a 'siglip_vision_model' checkpoint, the tokenizer's encoder")
def _(c):
    from tests.test_encoder_export import home_checkpoint

    home_checkpoint("siglip", c.path("siglip"))
    return train(c, "model=tiny_dinov2", f"model.encoder_weights={c.path('siglip')}")


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


@case("train: a latent cache made with another tokenizer", "was made with tokenizer.weights_sha256=")
def _(c):
    from unilip.tasks.generation.cache_latents import main as cache_latents

    common = ["experiment=generate/quickstart", f"paths.data_dir={c.photos}", "stage=1", "data.num_workers=0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits for a preempted peer on a shared machine
    try:
        cache_latents([*common, f"tokenizer_from={saved_tokenizer(c)}", f"latent_cache.dir={c.path('latents')}"])
    finally:
        torch.set_num_threads(threads)
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.manual_seed(1)
    UniLIPTokenizer(tokenizer_preset("tiny")).save_pretrained(other := c.path("other"))
    return train(c, *common, "task=generate", f"tokenizer_from={other}", f"latent_cache.dir={c.path('latents')}")


@case("train: the unified task without a generator", "task=unified needs generator_from=")
def _(c):
    return train(c, "task=unified", "stage=1", "experiment=unified/quickstart", "generator_from=null")


@case("benchmarks: Unified-Bench on a folder without images", "holds no images")
def _(c):
    text_file(c.path("pictures/notes.txt"))
    out = f"out={c.path('bench')}"
    return ["-m", "unilip.benchmarks", "unified", f"generator={c.path('gen')}", out, f"prompts={c.path('pictures')}"]


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


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in CASES]
)
def test_a_users_mistake_is_one_error_line_and_changes_nothing(name, photos_dir, tmp_path, request):
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
