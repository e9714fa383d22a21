"""`ReconstructionEvaluation`: one pass over an evaluation set, per-image records gathered from every rank."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from unilip.data.transforms import batch_to_float
from unilip.evaluation.fid_reference import ReferenceStatistics
from unilip.evaluation.metrics import ExternalFeatures, feature_similarity, psnr, ssim
from unilip.evaluation.protocols import reconstruct
from unilip.evaluation.quantize import QUANTIZE, inception_inputs
from unilip.models.tokenizer import FrozenEncoder, UniLIPTokenizer


class ReconstructionEvaluation(L.LightningModule):
    """Reconstructs every image once and records per-image metrics.

    Args:
        tokenizer: the model evaluated (its `pad_to_multiple` decides the 256 px protocol).
        teacher: the original encoder, for feature fidelity (None: not measured).
        lpips: a per-image LPIPS module (None: not measured).
        fid: a torchmetrics FID (None: not measured).
        external: an external feature model (None: not measured).
        grid_images: how many originals/reconstructions to keep for the grid.
        resize: "project" or "reference" (`unilip.evaluation.protocols`).
        reference: cached rFID reference statistics (None: the references are fed every time).
        quantize: how rFID's images become uint8 (`unilip.evaluation.quantize`): trunc, round or reference.
    """

    def __init__(
        self,
        tokenizer: UniLIPTokenizer,
        teacher: FrozenEncoder | None = None,
        lpips: nn.Module | None = None,
        fid: nn.Module | None = None,
        external: ExternalFeatures | None = None,
        grid_images: int = 8,
        resize: str = "project",
        reference: ReferenceStatistics | None = None,
        quantize: str = "trunc",
    ):
        super().__init__()
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r}: use one of {QUANTIZE}")
        if fid is not None and getattr(fid, "normalize", False):
            raise ValueError("the FID must take uint8 images (normalize=False): the evaluation quantises them itself")
        self.tokenizer = tokenizer.eval()
        self.teacher, self.lpips, self.fid, self.external = teacher, lpips, fid, external
        self.grid_images = grid_images
        self.records: list[dict[str, Any]] = []
        self.grid: list[torch.Tensor] = []
        self.fid_value: float | None = None
        self.skipped = {"samples": 0, "shards": 0}  # unreadable data of the pass, all ranks
        self.resize, self.reference, self.quantize = resize, reference, quantize
        self.feed_references = True  # False once cached reference statistics are loaded
        self.fid_note: str | None = None

    def on_validation_start(self) -> None:
        if self.fid is not None and self.reference is not None:
            self.feed_references = not self.reference.load_into(self.fid, self.global_rank)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the loaders deliver uint8 images; they become floats here, on the device
        return batch_to_float(batch) if isinstance(batch, dict) else batch

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        out = reconstruct(self.tokenizer, images, self.resize)
        if batch.get("padding"):  # a rank whose images are done keeps step with the others
            return
        recon = out.images.float().clamp(0, 1)
        columns = {"psnr": psnr(images, recon), "ssim": ssim(images, recon)}
        if self.lpips is not None:
            columns["lpips"] = self.lpips(images, recon).float()
        if self.teacher is not None:
            columns["feature_cosine"], columns["feature_mse"] = feature_similarity(
                out.features, self.teacher.features(images)
            )
        if self.external is not None:
            columns["external_cosine"] = self.external(images, recon).float()
        if self.fid is not None:
            real, fake = inception_inputs(images, recon, self.quantize)
            if self.feed_references:
                self.fid.update(real, real=True)
            self.fid.update(fake, real=False)
        values = {name: column.cpu().tolist() for name, column in columns.items()}
        for index, key in enumerate(batch["key"]):
            self.records.append({"key": key, **{name: value[index] for name, value in values.items()}})
        if len(self.grid) < self.grid_images and self.global_rank == 0:
            count = self.grid_images - len(self.grid)
            self.grid += [torch.stack([x, y]).cpu() for x, y in zip(images[:count], recon[:count], strict=True)]

    def on_validation_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        counts = getattr(datamodule, "skipped", {})  # this rank's, from the evaluation loader
        skipped = [counts.get("val/samples", 0), counts.get("val/shards", 0)]
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, (self.records, skipped))
            self.records = [record for part, _ in gathered for record in part]
            skipped = [sum(part[i] for _, part in gathered) for i in range(2)]
        self.skipped = {"samples": skipped[0], "shards": skipped[1]}
        self.records.sort(key=lambda record: record["key"])  # the same order whatever the number of ranks
        if self.fid is None:
            return
        if self.feed_references and self.reference is not None:
            self.reference.save_from(self.fid, self.global_rank)
        elif not self.feed_references and self.reference.count() != len(self.records):
            self.fid_note = (
                f"rFID not reported: the cached reference statistics ({self.reference.path}) hold "
                f"{self.reference.count()} images, this run read {len(self.records)}; delete the file to recompute"
            )
            return
        self.fid_value = float(self.fid.compute())  # torchmetrics reduces its statistics over ranks
