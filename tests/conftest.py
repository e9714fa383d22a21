"""Shared test set-up: offline, CPU, deterministic, small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` tokenizer preset from conf/model/tiny.yaml (the config users compose)."""
    from unilip.models.presets import tokenizer_preset

    return tokenizer_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_config):
    """A saved tiny tokenizer (seed 0), one per test module."""
    from unilip.models import UniLIPTokenizer

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tokenizer")
    UniLIPTokenizer(tiny_config).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_tokenizer(tiny_config):
    from unilip.models import UniLIPTokenizer

    torch.manual_seed(0)
    return UniLIPTokenizer(tiny_config).eval()


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory):
    """The bundled photo shards (scikit-image photographs), built once per test session."""
    from unilip.data import build_photo_shards

    root = tmp_path_factory.mktemp("data")
    build_photo_shards(root / "photos")
    return root


def compose_train(overrides: list[str]):
    """Compose conf/train.yaml as `python train.py <overrides>` would (without Hydra's run-time keys)."""
    from unilip.models.presets import compose_config

    return compose_config("train", overrides)


def quick_overrides(data_root, run_dir, *extra: str) -> list[str]:
    """The quick-start experiment shrunk for tests: tiny model, bundled photos, CPU, no perceptual nets."""
    return [
        "experiment=quickstart",
        f"paths.data_dir={data_root}",
        f"paths.runs_dir={run_dir.parent}",
        f"run_dir={run_dir}",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "data.pin_memory=false",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def compose_eval(data_root, out_dir, *overrides: str):
    """Compose conf/eval.yaml for the bundled photos on CPU."""
    from unilip.models.presets import compose_config

    return compose_config(
        "eval",
        [
            f"paths.data_dir={data_root}",
            f"out_dir={out_dir}",
            "trainer=cpu",
            "data.val_num_workers=0",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
    )
