"""Test-only pieces the generation configs can name (`_target_: tests.generation_helpers...`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset


class _Repeat(Dataset):
    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        return self.batch


class FixedCaptionedBatches(L.LightningDataModule):
    """The same batch of captioned photos every step (overfitting a handful of photos), one process.

    `images_file` holds {"image": (B, 3, S, S) in [0, 1], "caption": list[str]} (torch.save).
    """

    def __init__(self, images_file: str, steps: int, **_: object):
        super().__init__()
        data = torch.load(images_file, weights_only=True)
        count = data["image"].shape[0]
        self.batch = {
            "image": data["image"],
            "caption": list(data["caption"]),
            "key": [str(i) for i in range(count)],
            "source_image": torch.zeros_like(data["image"]),
            "has_source": torch.zeros(count, dtype=torch.bool),
        }
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, self.steps), batch_size=None, collate_fn=lambda b: b)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, 1), batch_size=None, collate_fn=lambda b: b)


def fingerprint(modules) -> str:
    """A hash of every parameter and buffer of `modules` (bit-exact)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class GenerationSnapshot(L.Callback):
    """At the start and end of fit: hashes of the frozen LLM and tokenizer (`frozen.json` in `directory`),
    and the generator's initial weights (`initial.safetensors`), for "what did this stage change" tests."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.hashes: dict[str, str] = {}

    def _record(self, pl_module, when: str) -> None:
        conditioner = pl_module.conditioner
        self.hashes[f"llm_{when}"] = fingerprint([conditioner.language_model])
        self.hashes[f"tokenizer_{when}"] = fingerprint([conditioner.tokenizer])

    def on_fit_start(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._record(pl_module, "start")
        state = {k: v.detach().cpu().contiguous().clone() for k, v in pl_module.generator.state_dict().items()}
        save_file(state, str(self.directory / "initial.safetensors"))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._record(pl_module, "end")
        (self.directory / "frozen.json").write_text(json.dumps(self.hashes))


def cache_overrides(photos_dir, workdir, tokenizer_dir, stage, *extra) -> list[str]:
    """The generation quick start at stage `stage`, shrunk: what both the cache command and train.py get."""
    return [
        "experiment=generate/quickstart",
        f"paths.data_dir={photos_dir}",
        f"paths.runs_dir={workdir / 'runs'}",
        f"stage={stage}",
        f"tokenizer_from={tokenizer_dir}",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "data.pin_memory=false",
        "data.batch_size=8",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "module.sample_steps=2",
        *extra,
    ]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the toy generator tests: tiny ops gain nothing from a second thread, and with
    two threads every op waits for a preempted peer whenever another job shares the two cores (~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
