"""Unified-Bench (UAE, "Can Understanding and Generation Truly Benefit Together?"): how well one model's
understanding and generation form an auto-encoder. Each image is captioned by the InternVL model carrying the
UniLIP encoder (understanding: image -> text), regenerated from its caption by the generator (generation:
text -> image), and the regeneration is compared with the source by several vision encoders.

Input (`prompts=`): a folder of images (searched recursively, in sorted order), or a `.txt` (one image path per
line) / `.jsonl` (`{"image": path, "key": optional name}`) list, paths relative to the list's folder.
Output, per image `<key>` (its path in the folder without the suffix):

    captions/<key>.txt     the caption (captions/captioner.json: the captioner and its settings)
    images/<key>.png       the regeneration (the shared prompt sampler: seed + image index, resumable)
    scores/per_image.jsonl {key, caption, <encoder>: cosine, ...} per image; scores/per_image.md the same table

Score (as UAE's Score_i2i.py reports it): per encoder the cosine of the pooled features of the source and the
regenerated image, averaged over images; overall: the plain mean of the encoders' means. Encoders come from
the `reward` config group (`reward=uae`: CLIP ViT-L/14, DINOv2-L, DINOv3 ViT-L/16, SigLIP so400m). Scoring runs
here, on rank 0; a rerun reuses every caption, image and score already made.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, existing_file, mean
from unilip.pipelines.manifest import SamplingError, file_digest, write_json
from unilip.pipelines.sampling import SampleJob, distributed_env, save_text, shard

log = logging.getLogger(__name__)

CAPTIONS = "captions"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PER_IMAGE = f"{SCORES}/per_image.jsonl"


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> (3, H, W) in [0, 1] (RGB, as a viewer shows it)."""
    import numpy as np
    from PIL import ImageOps

    with Image.open(path) as image:
        pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


class UnifiedBench(Benchmark):
    name = "unified"
    format_source = "PKU-YuanGroup/UAE: Unified-Bench (caption -> regenerate -> Score_i2i.py cosine similarity)"

    def __init__(
        self,
        prompts: str | None,
        generator: str,
        encoders: Sequence[dict[str, Any]],
        tokenizer: str | None = None,
        mllm_weights: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        captioner: str | None = None,
        prompt: str = "Describe this image in detail.",
        greedy: bool = True,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        timeout_s: float = 86400,
    ):
        from unilip.evaluation.similarity import EncoderSpec, describe

        self.prompts, self.generator, self.tokenizer, self.mllm_weights = prompts, generator, tokenizer, mllm_weights
        self.device, self.dtype, self.captioner = device, dtype, captioner
        self.prompt, self.greedy, self.temperature, self.max_new_tokens = prompt, greedy, temperature, max_new_tokens
        self.batch_size, self.timeout_s = batch_size, timeout_s
        self.specs = [EncoderSpec(**dict(spec)) for spec in encoders]
        if not self.specs:
            raise SamplingError("benchmark.encoders is empty; give at least one encoder (reward=uae)")
        encoders = ", ".join(f"{d['name']} ({d['weights']})" for d in describe(self.specs))
        self.judge = f"cosine of pooled features: {encoders}"
        self._sources: dict[str, Path] = {}
        self.skipped: list[dict[str, str]] = []

    def inputs(self) -> dict[str, str]:
        return {"images": str(self.prompts), "captioner": self._captioner_identity()["captioner"]}

    # ------------------------------------------------------------------ images
    def images(self) -> dict[str, Path]:
        """key -> image file, in the benchmark's order."""
        root = existing_file(self.prompts, "prompts", "a folder of images, or a .txt / .jsonl list of them")
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found = {str(p.relative_to(root).with_suffix("")): p for p in files}
        else:
            found = {}
            for number, line in enumerate(root.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                if root.suffix == ".jsonl":
                    try:
                        record = json.loads(line)
                        path = root.parent / record["image"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise SamplingError(f'{root}:{number}: not a {{"image": path}} JSON line') from None
                    key = str(record.get("key") or Path(record["image"]).with_suffix(""))
                else:
                    path, key = root.parent / line.strip(), str(Path(line.strip()).with_suffix(""))
                if key in found:
                    raise SamplingError(f"{root}:{number}: the key {key!r} appears twice")
                found[key] = path
        if not found:
            raise SamplingError(f"prompts={root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return found

    # ------------------------------------------------------------------ captions
    def _captioner_identity(self) -> dict[str, Any]:
        adapters = None
        if self.captioner:
            from unilip.models.captioner import adapters_file, locate_captioner

            try:
                directory = locate_captioner(self.captioner)
            except FileNotFoundError as error:
                raise SamplingError(f"benchmark.captioner: {error}") from None
            weights = adapters_file(directory)
            adapters = file_digest(weights) if weights.is_file() else None
        return {
            "captioner": str(self.captioner) if self.captioner else "the generator's MLLM (no adapters)",
            "adapters_sha256": adapters,
            "mllm_weights": self.mllm_weights,
            "tokenizer": self.tokenizer,
            "prompt": self.prompt,
            "greedy": self.greedy,
            "temperature": None if self.greedy else self.temperature,
            "max_new_tokens": self.max_new_tokens,
        }

    def _check_captions(self, out: Path) -> dict[str, Any]:
        """Refuse (before anything is written) captions in `out` made by another captioner or with other settings."""
        expected = self._captioner_identity()
        record = out / CAPTIONS / "captioner.json"
        if record.exists():
            found = json.loads(record.read_text())
            if found != expected:
                differs = sorted(k for k in expected if found.get(k) != expected[k])
                raise SamplingError(
                    f"{out} holds captions made with another captioner or settings ({', '.join(differs)}); "
                    "use another output directory, or delete it to start over"
                )
        return expected

    def _load_captioner(self, device: torch.device):
        from unilip.models.captioner import CaptionFormat, build_captioner, load_captioner
        from unilip.models.mllm import MLLMPreset
        from unilip.pipelines.generation import UniLIPPipeline

        pipe = UniLIPPipeline.from_pretrained(self.generator, tokenizer=self.tokenizer, mllm_weights=self.mllm_weights)
        settings = (CaptionFormat(prompt=self.prompt), self.max_new_tokens, self.temperature)
        tokenizer = pipe.conditioner.tokenizer
        if self.captioner:
            from unilip.models.captioner import locate_captioner

            source = locate_captioner(self.captioner)
            captioner, _, _ = load_captioner(source, tokenizer, self.mllm_weights, *settings)
        else:
            from unilip.models.generator import read_meta

            preset = MLLMPreset(**read_meta(Path(self.generator))["mllm"])
            if self.mllm_weights is not None:
                preset.weights = self.mllm_weights
            captioner = build_captioner(preset, tokenizer, pipe.conditioner.text_tokenizer, *settings)
        return captioner.to(device=device, dtype=getattr(torch, self.dtype))

    def caption(self, out: Path, order: dict[str, Path], seed: int) -> dict[str, str]:
        """Caption every image without a caption file (this rank's share), wait for the others, read them all."""
        rank, world, local = distributed_env()
        identity = self._check_captions(out)
        folder = out / CAPTIONS
        index = {key: i for i, key in enumerate(order)}
        missing = [key for key in order if not (folder / f"{key}.txt").exists()]
        mine = shard(missing, rank, world)
        if mine:
            device = torch.device(self.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
            captioner = self._load_captioner(device)
            log.info("rank %d: captioning %d images", rank, len(mine))
            for start in range(0, len(mine), self.batch_size):
                keys, pictures = [], []
                for key in mine[start : start + self.batch_size]:
                    try:
                        pictures.append(read_image(order[key]))
                        keys.append(key)
                    except (OSError, UnidentifiedImageError) as error:
                        log.warning("rank %d: skipping %s: %s", rank, order[key], error)
                if not keys:
                    continue
                features = torch.cat([captioner.image_features(p[None].to(device)) for p in pictures])
                if self.greedy:  # needs no randomness: one batch
                    texts = captioner.decode(captioner.sample(features, greedy=True))
                else:  # image i from seed + i: the same caption in any batch, on any rank
                    texts = [
                        captioner.decode(captioner.sample(f[None], torch.Generator().manual_seed(seed + index[k])))[0]
                        for k, f in zip(keys, features, strict=True)
                    ]
                for key, text in zip(keys, texts, strict=True):
                    save_text(text + "\n", folder / f"{key}.txt")
            del captioner
        if rank == 0:
            write_json(folder / "captioner.json", identity)
        _wait_for_each_other(world, self.timeout_s)
        return {key: (folder / f"{key}.txt").read_text().strip() for key in order if (folder / f"{key}.txt").exists()}

    # ------------------------------------------------------------------ the harness
    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        order = self.images()
        captions = self.caption(out, order, seed)
        self.skipped = [{"key": k, "reason": f"image {p} unreadable"} for k, p in order.items() if k not in captions]
        self._sources = {key: order[key] for key in captions}
        return [
            SampleJob(key, captions[key], seed + index, (f"{IMAGES}/{key}.png",))
            for index, key in enumerate(order)
            if key in captions
        ]

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        return []  # scored here, in `collect`

    def collect(self, out: Path) -> dict[str, Any] | None:
        """Score every regenerated image not yet in scores/per_image.jsonl, then aggregate (rank 0)."""
        from unilip.evaluation.similarity import ReconstructionSimilarity, overall

        path = out / PER_IMAGE
        rows = {}
        if path.exists():
            rows = {r["key"]: r for r in map(json.loads, path.read_text().splitlines()) if r.get("key")}
        todo = [k for k in self._sources if k not in rows and (out / IMAGES / f"{k}.png").exists()]
        if todo:
            device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            similarity = ReconstructionSimilarity.from_specs(self.specs).to(device)
            for key in todo:
                source = read_image(self._sources[key])[None].to(device)
                regenerated = read_image(out / IMAGES / f"{key}.png")[None].to(device)
                scores = similarity(source, regenerated)
                caption = (out / CAPTIONS / f"{key}.txt").read_text().strip()
                rows[key] = {"key": key, "caption": caption, **{n: float(v[0]) for n, v in scores.items()}}
        ordered = [rows[k] for k in self._sources if k in rows]
        if not ordered:
            return None
        save_text("".join(json.dumps(row) + "\n" for row in ordered), path)
        names = [spec.name for spec in self.specs]
        save_text(_per_image_markdown(ordered, names), out / SCORES / "per_image.md")
        means = {name: mean([row[name] for row in ordered]) for name in names}
        return {
            "overall": overall(means),
            "encoders": means,
            "images": len(ordered),
            "caption_words": mean([len(row["caption"].split()) for row in ordered]),
            "unreadable": self.skipped,
            "rule": "per encoder: cosine of the pooled features of source and regenerated image, mean over "
            "images; overall: mean over encoders (UAE's Score_i2i.py)",
        }


def _per_image_markdown(rows: list[dict[str, Any]], names: list[str]) -> str:
    lines = ["| image | " + " | ".join(names) + " | caption |", "|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        caption = row["caption"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['key']} | " + " | ".join(f"{row[n]:.4f}" for n in names) + f" | {caption} |")
    return "\n".join(lines) + "\n"


def _wait_for_each_other(world_size: int, timeout_s: float) -> None:
    """Under torchrun: every rank's captions are written before any rank reads them (a gloo barrier)."""
    if world_size <= 1 or not torch.distributed.is_available():
        return
    from datetime import timedelta

    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    torch.distributed.barrier()
    if created:
        torch.distributed.destroy_process_group()
