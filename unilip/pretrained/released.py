"""The authors' released generation models (UniLIP-1B, UniLIP-3B) as a `UniLIPGenerator`.

    python -m unilip.pretrained.released UniLIP-1B/ --preset unilip_1b --tokenizer 1b_unilip.pth --out unilip-1b-gen
    # then: UniLIPPipeline.from_pretrained("unilip-1b-gen") or python -m unilip.pipelines.generate ...

A released checkpoint is the state dict of the reference's `UniLIP_InternVLForCausalLM` (safetensors,
sharded or not) and its `config.json` (`n_query`, `connect_layer`, `unilip_factor`). What the generator
trains maps one to one:

    model.latent_queries (1, Q, D)   -> queries (Q, D)
    model.llm_connector.*            -> connector.*      (the LLM's last K layers and final norm)
    model.projector.*                -> projection.*
    model.dit.*                      -> dit.*            (diffusers' SanaTransformer2DModel names)

The frozen parts come from their own files, as in training: the LLM from the InternVL checkpoint of the
`mllm` preset, the UniLIP tokenizer from its release (`1b_unilip.pth` / `2b_unilip.pth`). Their copies
in the checkpoint (`model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.vae_decoder.*`) are recognised and not read. Any other key,
and any generator tensor the checkpoint lacks, is an error that lists them (strict, like the tokenizer
import in `unilip.pretrained.internvl`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unilip.models.generator import DiTPreset, GeneratorConfig, UniLIPGenerator, from_state
from unilip.models.hub import StateDictMismatchError, _listing, safetensors_files
from unilip.models.mllm import MLLMPreset

log = logging.getLogger(__name__)

QUERIES = "model.latent_queries"
RENAMES = {"model.llm_connector.": "connector.", "model.projector.": "projection.", "model.dit.": "dit."}
FROZEN_PREFIXES = (
    "model.language_model.",
    "lm_head.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.vae_decoder.",
)
# The released sizes: preset name -> (experiment preset: its mllm, dit and tokenizer model presets).
PRESETS = {"unilip_1b": "generate/unilip_1b", "unilip_3b": "generate/unilip_3b"}


def generator_keys(keys: list[str]) -> dict[str, str]:
    """Released key -> generator key for the tensors the generator holds; unknown keys are an error."""
    mapped, unknown = {}, []
    for key in keys:
        if key == QUERIES:
            mapped[key] = "queries"
        elif prefix := next((p for p in RENAMES if key.startswith(p)), None):
            mapped[key] = RENAMES[prefix] + key[len(prefix) :]
        elif not key.startswith(FROZEN_PREFIXES):
            unknown.append(key)
    if unknown:
        raise StateDictMismatchError(f"keys of no part of the released UniLIP model: {_listing(sorted(unknown))}")
    return mapped


def read_released(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The generator's tensors (our names, float32) and the checkpoint's config.json; the frozen copies are not read."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"'{path}' has no config.json: not a released UniLIP generation checkpoint")
    config = json.loads(config_file.read_text())
    missing = [k for k in ("n_query", "connect_layer") if k not in config]
    if missing:
        raise ValueError(f"'{config_file}' lacks {missing}: not a released UniLIP generation checkpoint")
    state = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key, name in generator_keys(list(handle.keys())).items():
                tensor = handle.get_tensor(key).float()  # bf16 -> fp32 is exact
                state[name] = tensor.squeeze(0) if key == QUERIES else tensor
    return state, config


def load_released_generator(path: str | Path, mllm: MLLMPreset, dit: DiTPreset) -> tuple[UniLIPGenerator, dict]:
    """A released checkpoint as a `UniLIPGenerator` of the `mllm` / `dit` presets' sizes, loaded strictly."""
    state, config = read_released(path)
    text = mllm.text_config().to_dict()
    generator_config = GeneratorConfig(
        text, dict(dit.transformer), int(config["n_query"]), int(config["connect_layer"])
    )
    return from_state(generator_config.to_dict(), state, f"released checkpoint '{path}'"), config


def import_released(
    checkpoint: str | Path,
    out: str | Path,
    mllm: MLLMPreset,
    dit: DiTPreset,
    tokenizer_source: str,
    tokenizer_config: dict[str, Any],
    flow_shift: float | None = None,
) -> Path:
    """Write a released checkpoint as a saved generator (`UniLIPPipeline.from_pretrained(out)` loads it)."""
    generator, config = load_released_generator(checkpoint, mllm, dit)
    scale = float(config.get("unilip_factor") or tokenizer_config.get("latent_scale"))
    meta = {
        "stage": 3,
        "mllm": mllm.to_dict(),
        "dit": dit.to_dict(),
        "tokenizer": {"source": tokenizer_source, "config": tokenizer_config},
        "latents": {"kind": "unilip", "scale": scale},
        "sampler": {"flow_shift": flow_shift if flow_shift is not None else dit.sampler_flow_shift()},
        "init_from": str(checkpoint),
        "released": {"checkpoint": str(checkpoint), "unilip_factor": config.get("unilip_factor")},
    }
    generator.save_pretrained(out, meta=meta)
    log.info("wrote the released generator of %s to %s", checkpoint, out)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="directory of a released UniLIP-1B / UniLIP-3B checkpoint")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--tokenizer", required=True, help="its UniLIP tokenizer (1b_unilip.pth / 2b_unilip.pth, ...)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mllm-weights", help="InternVL checkpoint (default: the preset's hub id)")
    parser.add_argument("--dit-weights", help="SANA pipeline whose scheduler config gives the sampler's flow_shift")
    parser.add_argument("--flow-shift", type=float, help="instead of reading it from the SANA scheduler config")
    args = parser.parse_args(argv)
    from hydra.utils import instantiate

    from unilip.logs import cli_logging, one_line_errors
    from unilip.models.presets import compose_config

    cli_logging()

    with one_line_errors(OSError, ValueError, StateDictMismatchError):
        cfg = compose_config("train", [f"experiment={PRESETS[args.preset]}", "stage=3", "run_dir=unused"])
        mllm: MLLMPreset = instantiate(cfg.mllm)
        dit: DiTPreset = instantiate(cfg.dit)
        if args.mllm_weights:
            mllm.weights = mllm.text_tokenizer = args.mllm_weights
        if args.dit_weights:
            dit.weights = args.dit_weights
        tokenizer_config = instantiate(cfg.model.config).to_dict()
        tokenizer = str(Path(args.tokenizer).resolve()) if Path(args.tokenizer).exists() else args.tokenizer
        return import_released(args.checkpoint, args.out, mllm, dit, tokenizer, tokenizer_config, args.flow_shift)


if __name__ == "__main__":
    main()
