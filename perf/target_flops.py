"""What cached targets save at real size: FLOPs of the frozen encoders per sample against the training step's,
and the disk a cached sample takes.

    python perf/target_flops.py [--presets unilip_1b unilip_2b] [--json docs/measurements/target_flops.json]

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` with grouped convolutions' weight
gradients corrected, as the training modules count them for MFU (`unilip.training.flops`: matrix
multiplications, attention and convolutions; elementwise work is not counted), on models built
on the meta device: real sizes, no memory, no weights, no arithmetic. Per sample:

- target: the UniLIP encoder at 448 px (InternViT over 1,025 tokens, projector, bottleneck) for stages 2-3;
  the DC-AE f32c32 encoder at 512 px for stage 1 (diffusers' default AutoencoderDC config with SANA's block
  types: the f32c32 architecture; the 1.1 weights' config is not read offline);
- source features of an edit: InternViT + projector at 448 px;
- the step: `GenerationTraining.flow_loss` forward and the gradients of the trained parameters (stage 1:
  queries, connector, projection, through the frozen DiT; stages 2-3: + the DiT), with a 128-token prompt
  plus the 256 queries, and an edit's 256 image tokens; without activation checkpointing (model FLOPs) and
  with it (`_recompute`: the recipe's setting, whose backward runs the LLM, connector and DiT forwards again).

Disk: the bytes a cached sample adds to a tar shard (members, headers, padding), bf16, with a 1 kB caption.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
import webdataset as wds
from diffusers import AutoencoderDC
from hydra.utils import instantiate

from unilip.data.latent_cache import MEMBER, pack
from unilip.models.generator import UniLIPGenerator, build_dit
from unilip.models.mllm import DualConditioner, PromptBatch, build_language_model, byte_level_tokenizer
from unilip.models.presets import compose_config
from unilip.pretrained import build_tokenizer
from unilip.tasks.generation.module import GenerationTraining
from unilip.training.flops import flop_counter

PRESETS = {"unilip_1b": ("internvl3_1b", "sana_600m"), "unilip_2b": ("internvl3_2b", "sana_1600m")}
PROMPT_TOKENS, IMAGE_TOKENS = 128, 256
DCAE_BLOCKS = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3


def _no_mask_shortcut(*args, **kwargs) -> bool:
    # transformers skips the causal mask when the padding mask is all ones, which it checks with a host read
    # (impossible on meta); building the mask costs no counted FLOPs, and the attention's are the same
    return False


def count(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def build(preset: str):
    mllm_name, dit_name = PRESETS[preset]
    cfg = compose_config(
        "train", ["task=generate", "stage=2", f"model={preset}", f"mllm={mllm_name}", f"dit={dit_name}", "run_dir=."]
    )
    tokenizer = build_tokenizer(instantiate(cfg.model.config), device="meta")
    mllm = instantiate(cfg.mllm)
    language_model = build_language_model(mllm, device="meta")
    with torch.device("meta"):
        generator = UniLIPGenerator.from_language_model(
            language_model, build_dit(instantiate(cfg.dit), device="meta"), num_queries=256, connector_layers=6
        )
    # the byte-level text tokenizer stands in for InternVL's: prompts are made here at a fixed token count
    conditioner = DualConditioner(
        language_model, byte_level_tokenizer(), tokenizer, 261, mllm.prompts, source_size=448
    ).requires_grad_(False)
    return tokenizer, conditioner, generator


def prompt(edit: bool) -> PromptBatch:
    """One row: PROMPT_TOKENS text tokens (+ IMAGE_TOKENS image tokens for an edit), then the 256 queries, on meta."""
    text = PROMPT_TOKENS + (IMAGE_TOKENS if edit else 0)
    length = text + 256
    image = torch.zeros(1, length, dtype=torch.bool)
    if edit:
        image[0, PROMPT_TOKENS : PROMPT_TOKENS + IMAGE_TOKENS] = True
    queries = torch.zeros(1, length, dtype=torch.bool)
    queries[0, text:] = True
    batch = PromptBatch(
        torch.zeros(1, length, dtype=torch.long), torch.ones(1, length, dtype=torch.bool), queries, image
    )
    return batch._replace(num_image_tokens=IMAGE_TOKENS if edit else 0).to("meta")


def step_flops(conditioner, generator, tokenizer, train_dit: bool, edit: bool, recompute: bool = False) -> int:
    module = GenerationTraining(generator, conditioner, None, stage=2, optimizer=torch.optim.AdamW, train_dit=train_dit)
    if recompute:
        module.gradient_checkpointing = True
        module.configure_model()
    module.train()
    x0 = torch.zeros(1, 32, 16, 16, device="meta")
    features = torch.zeros(1, IMAGE_TOKENS, tokenizer.config.llm_hidden_size, device="meta") if edit else None
    t = torch.full((1,), 0.5, device="meta")

    def run():
        module.flow_loss(x0, prompt(edit), features, t, torch.zeros_like(x0)).backward()  # as the step does

    return count(run)


def sample_bytes(latent_shape, features_shape, caption_bytes: int = 1000, samples: int = 100) -> float:
    """Bytes per cached sample in a tar shard: the size of `samples` of them over an empty shard's (the tar's
    end blocks and record padding belong to the shard)."""
    source = torch.zeros(features_shape) if features_shape else None
    data = pack(torch.zeros(latent_shape), source, torch.bfloat16)

    def shard(count: int) -> int:
        out = io.BytesIO()
        with wds.TarWriter(out, encoder=False, mtime=0) as writer:  # as the cache writes its shards
            for i in range(count):
                writer.write({"__key__": f"{i:09d}", MEMBER: data, "txt": b"x" * caption_bytes})
        return len(out.getvalue())

    return (shard(samples) - shard(0)) / samples


def measure(preset: str) -> dict:
    tokenizer, conditioner, generator = build(preset)
    image = torch.zeros(1, 3, 448, 448, device="meta")
    target = count(lambda: tokenizer.encode(image))
    source = count(lambda: tokenizer.features(image))
    with torch.device("meta"):
        dcae = AutoencoderDC(encoder_block_types=DCAE_BLOCKS, decoder_block_types=DCAE_BLOCKS)
    dcae_target = count(lambda: dcae.encode(torch.zeros(1, 3, 512, 512, device="meta")))
    width = tokenizer.config.llm_hidden_size
    row = {
        "preset": preset,
        "encode_unilip_448": target,
        "source_features_448": source,
        "encode_dcae_512": dcae_target,
        "step_stage1_t2i": step_flops(conditioner, generator, tokenizer, train_dit=False, edit=False),
        "step_stage2_t2i": step_flops(conditioner, generator, tokenizer, train_dit=True, edit=False),
        "step_stage2_edit": step_flops(conditioner, generator, tokenizer, train_dit=True, edit=True),
        "step_stage1_t2i_recompute": step_flops(conditioner, generator, tokenizer, False, False, recompute=True),
        "step_stage2_t2i_recompute": step_flops(conditioner, generator, tokenizer, True, False, recompute=True),
        "step_stage2_edit_recompute": step_flops(conditioner, generator, tokenizer, True, True, recompute=True),
        "bytes_t2i": sample_bytes((32, 16, 16), None),
        "bytes_edit": sample_bytes((32, 16, 16), (IMAGE_TOKENS, width)),
    }
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import transformers.masking_utils

    transformers.masking_utils._ignore_causal_mask_sdpa = _no_mask_shortcut
    rows = [measure(preset) for preset in args.presets]
    for r in rows:
        t = 1e12
        stage1 = r["encode_dcae_512"] / (r["encode_dcae_512"] + r["step_stage1_t2i"])
        t2i = r["encode_unilip_448"] / (r["encode_unilip_448"] + r["step_stage2_t2i"])
        encode_edit = r["encode_unilip_448"] + r["source_features_448"]
        edit = encode_edit / (encode_edit + r["step_stage2_edit"])
        print(
            f"{r['preset']}: encode UniLIP 448 {r['encode_unilip_448'] / t:.3f} TFLOP, source features "
            f"{r['source_features_448'] / t:.3f}, DC-AE 512 {r['encode_dcae_512'] / t:.3f}; step stage 1 "
            f"{r['step_stage1_t2i'] / t:.3f}, stage 2 t2i {r['step_stage2_t2i'] / t:.3f}, edit "
            f"{r['step_stage2_edit'] / t:.3f} TFLOP per sample; the encoders' share: stage 1 {100 * stage1:.0f}%, "
            f"stage 2 t2i {100 * t2i:.0f}%, edit {100 * edit:.0f}%; disk {r['bytes_t2i'] / 1e3:.1f} kB (t2i), "
            f"{r['bytes_edit'] / 1e3:.1f} kB (edit)"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
