"""A generator at the quick start's sizes with random weights, saved as training saves one: for tests, demos and
trying the sampling tools without downloading weights."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate


def save_toy_generator(root: Path, num_queries: int = 8, seed: int = 0) -> Path:
    """The quick-start generator (tiny InternVL, tiny SANA, tiny tokenizer) with seeded random weights, saved under
    `root/generator` with the metadata `GenerationTraining.save_result` writes (its tokenizer under
    `root/tokenizer`). Returns the generator directory."""
    from unilip.models import UniLIPTokenizer
    from unilip.models.generator import UniLIPGenerator, build_dit
    from unilip.models.mllm import build_conditioner
    from unilip.models.presets import compose_config, tokenizer_preset

    root = Path(root)
    cfg = compose_config("train", ["task=generate", "experiment=generate/quickstart", "stage=3", "run_dir=unused"])
    mllm, dit = instantiate(cfg.mllm), instantiate(cfg.dit)
    torch.manual_seed(seed)
    tokenizer = UniLIPTokenizer(tokenizer_preset("tiny")).eval()
    tokenizer.save_pretrained(root / "tokenizer")
    conditioner = build_conditioner(mllm, tokenizer)
    generator = UniLIPGenerator.from_language_model(conditioner.language_model, build_dit(dit), num_queries, 2)
    meta = {
        "stage": 3,
        "mllm": mllm.to_dict(),
        "dit": dit.to_dict(),
        "tokenizer": {"source": str(root / "tokenizer"), "config": tokenizer.config.to_dict()},
        "latents": {"kind": "unilip", "scale": cfg.latent_scale},
        "sampler": {"flow_shift": 3.0},
        "init_from": None,
    }
    generator.save_pretrained(root / "generator", meta=meta)
    return root / "generator"
