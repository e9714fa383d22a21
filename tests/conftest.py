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
    from unilip.models.loading import tokenizer_preset

    return tokenizer_preset("tiny")


@pytest.fixture
def tiny_tokenizer(tiny_config):
    from unilip.models import UniLIPTokenizer

    torch.manual_seed(0)
    return UniLIPTokenizer(tiny_config).eval()
