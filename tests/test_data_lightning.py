"""Through a real Lightning Trainer: the loader state rides in the checkpoint, and a run stopped
mid-epoch and resumed sees exactly the batches of the uninterrupted run."""

from __future__ import annotations

import io

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn

from unilip.data import ShardDataModule
from unilip.data.shards import ShardSink


def shards(root, count: int, per_shard: int) -> list[str]:
    """`count` shards of tiny random JPEGs."""
    with ShardSink(root, "s", per_shard) as sink:
        for i in range(count * per_shard):
            image = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image, "JPEG")
            sink.write({"__key__": f"k{i}", "jpg": image.getvalue(), "txt": f"caption {i}".encode()})
    return sink.shards


class RecordBatches(L.LightningModule):
    """Keeps (keys, image checksum, captions) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((tuple(batch["key"]), float(batch["image"].double().sum()), tuple(batch["caption"])))
        return (self.weight * batch["image"].float().mean()).sum()  # uint8 from the loader

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(urls: list[str], max_steps: int, root, ckpt_path=None, callbacks=()) -> RecordBatches:
    datamodule = ShardDataModule(
        train_sources=[{"name": "a", "urls": urls, "weight": 1.0}],
        image_size=16,
        batch_size=3,
        train_batches_per_epoch=4,
        num_workers=2,
        shuffle_buffer=6,
    )
    module = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return module


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|val_dataloader|limit_val_batches).*")
def test_lightning_resume_mid_epoch_sees_the_uninterrupted_batches(tmp_path):
    urls = shards(tmp_path, 3, per_shard=7)
    reference = _fit(urls, max_steps=10, root=tmp_path / "a").seen

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    first = _fit(urls, max_steps=6, root=tmp_path / "b", callbacks=[checkpoint]).seen  # stops in epoch 1, batch 2
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    resumed = _fit(urls, 10, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "step=6.ckpt", callbacks=[again]).seen

    assert len(reference) == 10 and first == reference[:6]
    assert resumed == reference[6:]
