"""`ShardDataModule`: webdataset shards in, clean batches out, on any number of ranks and workers.

Batch contract (every loader of this module)::

    batch = {
        "image":   ByteTensor (B, 3, S, S) uint8        # image to reconstruct/generate; edit samples: the target
        "caption": list[str]                            # txt/json caption; edit samples: the instruction; "" if none
        "key":     list[str]                            # webdataset __key__
        # only with `with_source=True`:
        "source_image": ByteTensor (B, 3, S, S)         # edit source image; zeros for text-to-image samples
        "has_source":   BoolTensor (B,)
    }

Images stay uint8 up to the device (pinned when CUDA is used): the modules turn them into floats in
[0, 1] there (`unilip.data.transforms.batch_to_float`), bit for bit the values of a float conversion on
the host. Sample formats are documented in `unilip.data.transforms`. Skipped data (undecodable samples,
unreadable or truncated shards) is counted in `datamodule.skipped`, per rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from unilip.data.index import shard_counts
from unilip.data.latent_cache import expand_sources, source_caches, with_cache
from unilip.data.loaders import EvalLoader, TrainLoader
from unilip.data.shards import DataError, SkipCounter, expand_urls, read_shard
from unilip.data.streams import TrainSource
from unilip.data.transforms import SampleTransform
from unilip.errors import ConfigError

log = logging.getLogger(__name__)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.{name}={value!r}: must be a positive integer")


class ShardDataModule(L.LightningDataModule):
    """Training on a weighted mix of shard sources; validation on a fixed set of shards.

    Args:
        train_sources: list of `{name: str, urls: list | glob | brace pattern, weight: float}` or
            `{name, urls, repeat: int}`. With weights, a sample is drawn from a source with probability
            weight / sum of weights (UniLIP tokenizer: BLIP3o short caption / long caption / JourneyDB at
            0.2 / 0.6 / 0.2). With repeats (the reference's generation recipe, e.g. edits x10), a data
            epoch reads each source `repeat` times, so its weight is repeat x its sample count, read from
            the shards' `index.json` (`unilip.data.index`), or given as `samples: int` (shards streamed
            with `pipe:` urls have no local index). None for an evaluation-only module.
        val_urls: validation (or evaluation) shards: list, glob or brace pattern; None for none.
        image_size: side S of the square crops (224, 448, ...).
        batch_size: training samples per batch per rank.
        train_batches_per_epoch: batches per rank that make an epoch (the stream is endless and
            re-seeded each epoch).
        val_batch_size: validation batch size (default: `batch_size`).
        num_workers: training DataLoader workers per rank; resuming needs the same number.
        val_num_workers: validation workers (default: `num_workers`).
        random_flip: random horizontal flips in training.
        flip_edits: flip edit pairs too (off: instructions may say "left" and "right").
        with_source: add `source_image` / `has_source` to batches (generation and editing).
        resize: "shorter_edge" (resize, crop, flip: the tokenizer recipe) or "square" (the whole image
            to S x S, never cropped or flipped: generation, whose captions name places and objects).
        latent_cache: a directory of cached generation targets (`python -m unilip.tasks.generation.cache_latents`):
            each training source is read from `<latent_cache>/<name>/` and batches hold latents instead
            of images. Sources whose urls point at cached shards are read as such without it. Validation
            always reads images.
        seed: seed of the training stream; same seed, same data, on any machine.
        shuffle_buffer: raw samples per source and worker in the shuffle buffer.
        max_consecutive_failures: undecodable samples (or empty shard reads) in a row that stop
            the run with one clear error instead of spinning.
        pin_memory: pin training and validation batches (only when CUDA is available).
        prefetch_factor: batches prepared ahead per worker.
        build_photos: let `prepare_data` build the bundled photo shards in `photos_dir` if missing.
        photos_dir: where `build_photos` writes them.
        rank, world_size: data-parallel rank and size; default: the trainer's at `setup`
            (or 0 and 1 without a trainer). Set them to simulate ranks in tests.
    """

    def __init__(
        self,
        train_sources: Sequence[Mapping[str, Any]] | None = None,
        val_urls: str | Sequence[str] | None = None,
        image_size: int = 224,
        batch_size: int = 16,
        train_batches_per_epoch: int = 1000,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        val_num_workers: int | None = None,
        random_flip: bool = True,
        flip_edits: bool = False,
        with_source: bool = False,
        resize: str = "shorter_edge",
        latent_cache: str | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 100,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        build_photos: bool = False,
        photos_dir: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        _positive("image_size", image_size)
        _positive("batch_size", batch_size)
        _positive("train_batches_per_epoch", train_batches_per_epoch)
        _positive("shuffle_buffer", shuffle_buffer)
        _positive("max_consecutive_failures", max_consecutive_failures)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers}: must be >= 0")
        if build_photos and not photos_dir:
            raise ConfigError("data.build_photos=true needs data.photos_dir (where to write the photo shards)")
        self.latent_cache = latent_cache
        self.train_sources = [_parse_source(i, s) for i, s in enumerate(train_sources or [])]
        names = [s["name"] for s in self.train_sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.train_sources: names {names} must be unique")
        self.val_urls = val_urls
        self.image_size = image_size
        self.batch_size = batch_size
        self.train_batches_per_epoch = train_batches_per_epoch
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.random_flip, self.flip_edits, self.with_source = random_flip, flip_edits, with_source
        self.resize = resize
        self._transform(train=True)  # a bad `resize` fails here, not in a worker
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.build_photos, self.photos_dir = build_photos, photos_dir
        self.rank, self.world_size = rank, world_size
        self._expanded: tuple[dict[str, tuple[str, ...]], dict[str, int | None]] | None = None
        self._train_loader: TrainLoader | None = None
        self._val_loader: EvalLoader | None = None

    def prepare_data(self) -> None:
        """Build the bundled photo shards once (Lightning calls this on one process per node)."""
        self.prepare(local_rank=0)

    def prepare(self, local_rank: int | None = None) -> None:
        """What must exist before the shard lists are expanded: local rank 0 (of each machine) checks the other
        sources, then builds the bundled photos if they are missing; the other processes wait for them.

        `train` calls this before the step plan counts the shards, on every process the launcher started
        (torchrun and SLURM start all of them at once); `local_rank` defaults to the launcher's (`LOCAL_RANK`,
        `SLURM_LOCALID`, else 0). Lightning's `prepare_data` later finds everything in place.
        """
        if not self.build_photos:
            return
        from unilip.data.samples import ensure_photo_shards

        builder = (launch_local_rank() if local_rank is None else local_rank) == 0
        if builder:
            # The other sources first: a run whose own data is missing stops before anything is written.
            for source in with_cache(self.train_sources, self.latent_cache):
                urls = [source["urls"]] if isinstance(source["urls"], str) else source["urls"]
                if not all(str(url).startswith(str(self.photos_dir)) for url in urls):
                    expand_urls(source["urls"], f"data.train_sources[{source['name']}].urls")
        ensure_photo_shards(self.photos_dir, builder)

    def setup(self, stage: str | None = None, rank: int | None = None, world_size: int | None = None) -> None:
        """Expand the urls (a glob that matches nothing fails here) and fix this process's rank."""
        trainer = self.trainer
        self.rank = rank if rank is not None else self.rank
        self.world_size = world_size if world_size is not None else self.world_size
        if self.rank is None:
            self.rank = trainer.global_rank if trainer is not None else 0
        if self.world_size is None:
            self.world_size = trainer.world_size if trainer is not None else 1
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"data: rank {self.rank} is not in [0, world_size={self.world_size})")
        urls, counts = self._shards()
        weights = {}
        for source in self.train_sources:
            name, repeat = source["name"], source.get("repeat")
            if repeat is not None and counts[name] is None:
                raise DataError(
                    f"data.train_sources[{name}] gives repeat={repeat}, but its shards have no sample counts; "
                    "count them once: python -m unilip.data.index <their directory> (streamed shards: give the "
                    "source's `samples`, the total of its index.json)"
                )
            weights[name] = source["weight"] if repeat is None else repeat * counts[name]
        self._sources = [TrainSource(name, urls[name], weights[name]) for name in urls]
        self.caches = source_caches(urls)  # None: images; refuses a mix, or an incomplete cache
        self._val = expand_urls(self.val_urls, "data.val_urls") if self.val_urls else []
        if self._val and source_caches({"validation": self._val}) is not None:
            raise DataError(
                "data.val_urls points at cached latents; validation reads images (it samples and shows them)"
            )

    def epoch_samples(self) -> tuple[int | None, dict[str, tuple[int | None, int | None]]]:
        """Samples in one data epoch (sum of repeat x count; None unless every source gives a repeat
        and is counted), and per source (repeat, count). Expands the urls (a glob matching nothing fails)."""
        counts = self._shards()[1]
        per_source = {s["name"]: (s.get("repeat"), counts[s["name"]]) for s in self.train_sources}
        known = per_source and all(r is not None and n is not None for r, n in per_source.values())
        return (sum(r * n for r, n in per_source.values()) if known else None), per_source

    def _shards(self) -> tuple[dict[str, tuple[str, ...]], dict[str, int | None]]:
        """Per training source: its expanded shard urls and its sample count (None if not indexed)."""
        if self._expanded is None:
            sources = with_cache(self.train_sources, self.latent_cache)
            urls = {name: tuple(shards) for name, shards in expand_sources(sources).items()}
            # A streamed source's count is given; a latent cache counts its own shards.
            given = {s["name"]: s["samples"] for s in self.train_sources if self.latent_cache is None}
            self._expanded = urls, {name: given.get(name) or _count(shards) for name, shards in urls.items()}
        return self._expanded

    def read_one_validation_sample(self) -> None:
        """Read validation samples until one decodes (normally the first): a validation set in which nothing can
        be read fails now, in one line, instead of at the first validation, thousands of steps into the run."""
        if not self.val_urls:
            return
        urls = expand_urls(self.val_urls, "data.val_urls")
        counter, transform = SkipCounter(verbose=False), self._transform(train=False)
        for url in urls:
            samples = read_shard(url, counter)
            try:
                for raw in samples:
                    try:
                        transform(raw, None)
                    except Exception as error:  # an undecodable sample: try the next, as validation would
                        counter.sample_failed(raw.get("__key__", "?"), url, error)
                        continue
                    return
            finally:
                with contextlib.suppress(Exception):  # stop reading (a `pipe:` download ends; its complaint is moot)
                    samples.close()
        raise DataError(
            f"data.val_urls: no validation sample could be read from its {len(urls)} shard(s) "
            f"(last: {counter.last_error or 'no samples'}); fix the shards, or set data.val_urls=null to train "
            "without validation"
        )

    def _transform(self, train: bool) -> SampleTransform:
        return SampleTransform(self.image_size, train, self.random_flip, self.flip_edits, self.with_source, self.resize)

    def train_dataloader(self) -> TrainLoader:
        """The training loader; the same one on every call, so that its position (epoch, batch)
        carries over if Lightning asks again (e.g. `reload_dataloaders_every_n_epochs`)."""
        if not self.train_sources:
            raise ConfigError("data.train_sources is empty: this data config is for evaluation only")
        self._ensure_setup()
        loader = self._train_loader
        if loader is not None and (loader.rank, loader.world_size) == (self.rank, self.world_size):
            return loader
        self._train_loader = TrainLoader(
            self._sources,
            self._transform(train=True),
            self.batch_size,
            self.train_batches_per_epoch,
            num_workers=self.num_workers,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=self.shuffle_buffer,
            max_consecutive_failures=self.max_consecutive_failures,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        return self._train_loader

    def val_dataloader(self) -> EvalLoader | list:
        self._ensure_setup()
        if not self._val:
            return []  # Lightning skips validation without loaders
        self._val_loader = EvalLoader(
            self._val,
            self._transform(train=False),
            self.val_batch_size,
            num_workers=self.val_num_workers,
            rank=self.rank,
            world_size=self.world_size,
            max_consecutive_failures=self.max_consecutive_failures,
            pin_memory=self.pin_memory,
        )
        return self._val_loader

    def test_dataloader(self) -> EvalLoader | list:
        return self.val_dataloader()

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped on this rank: `train/samples`, `train/shards` (all delivered training batches) and
        `val/samples`, `val/shards` (latest validation pass). Sum over ranks for the run's total."""
        train = self._train_loader.skipped if self._train_loader else {"samples": 0, "shards": 0}
        val = self._val_loader.skipped if self._val_loader else {"samples": 0, "shards": 0}
        return {f"train/{k}": v for k, v in train.items()} | {f"val/{k}": v for k, v in val.items()}

    def _ensure_setup(self) -> None:
        if not hasattr(self, "_sources"):
            self.setup()


def launch_local_rank() -> int:
    """This process's rank on its machine as the launcher set it, before any trainer exists: `LOCAL_RANK`
    (torchrun, and the processes Lightning starts), else `SLURM_LOCALID` (srun), else 0 (one process)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def _parse_source(index: int, source: Mapping[str, Any]) -> dict[str, Any]:
    where = f"data.train_sources[{index}]"
    if not isinstance(source, Mapping) or "urls" not in source:
        raise ConfigError(
            f"{where}={source!r}: expected {{name: str, urls: list | glob | brace pattern, weight: float}}"
        )
    if "weight" in source and "repeat" in source:
        raise ConfigError(f"{where}: give weight (a sampling share) or repeat (reads per data epoch), not both")
    weight = float(source.get("weight", 1.0))
    if not weight > 0:
        raise ConfigError(f"{where}.weight={weight}: must be > 0")
    repeat = source.get("repeat")
    if repeat is not None and (not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1):
        raise ConfigError(f"{where}.repeat={repeat!r}: must be a positive integer")
    samples = source.get("samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise ConfigError(f"{where}.samples={samples!r}: must be a positive integer (the source's sample count)")
    urls = source["urls"]
    urls = str(urls) if isinstance(urls, (str, Path)) else [str(u) for u in urls]
    name = str(source.get("name", f"source{index}"))
    return {"name": name, "urls": urls, "weight": weight, "repeat": repeat, "samples": samples}


def _count(urls: Sequence[str]) -> int | None:
    """Samples in these shards, or None if any of them is not in its directory's index."""
    counts = shard_counts(urls).values()
    return None if any(n is None for n in counts) else sum(counts)
