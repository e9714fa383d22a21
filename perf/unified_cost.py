"""What one step of the unified task costs at real size, estimated from counted FLOPs (no weights, no GPU).

    python perf/unified_cost.py [--preset unilip_1b] [--images 4] [--group 8] [--caption-tokens 256]
        [--render-steps 20] [--sde-steps 10] [--peak-tflops 989] [--mfu 0.4] [--json out.json]

Every network of the step is built at its real size on PyTorch's `meta` device (shapes only) and each piece of
the step runs once under `torch.utils.flop_counter`: the captioner's image features, prompt and one decoding
step (times the caption length), the log-probability forward and backward, the KL reference forward; the
generator's condition (MLLM + connector), DiT steps with classifier-free guidance, the latent decoder; the four
reward encoders. Per GPU: `--images` images x `--group` rollouts. Time = FLOPs / (peak x `--mfu`) for the
batched passes, plus the caption's token-by-token decoding, which is bound by reading the LLM's weights once per
token (`--bandwidth` GB/s) and by kernel launches (`--launch-us` per layer per token). Captions are assumed to run
to `--caption-tokens` (the cost grows with them; UAE's captions lengthen as the loop trains).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from unilip.logs import quiet_third_party_noise
from unilip.models.presets import compose_config, tokenizer_preset

META = torch.device("meta")
PRESETS = {"unilip_1b": ("internvl3_1b", "sana_600m"), "unilip_2b": ("internvl3_2b", "sana_1600m")}
# Unified-Bench's encoders (conf/reward/uae.yaml) as transformers configs: (model type, config, input side)
ENCODERS = {
    "clip ViT-L/14": ("clip_vision_model", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, patch_size=14, image_size=224), 224),
    "dinov2-large": ("dinov2", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                                    image_size=518), 224),
    "dinov3 ViT-L/16": ("dinov3_vit", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, patch_size=16, num_register_tokens=4), 224),
    "siglip so400m/14": ("siglip_vision_model", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                     num_attention_heads=16, patch_size=14, image_size=384), 384),
}  # fmt: skip


def flops(function) -> float:
    """FLOPs of `function()`. A convolution's backward is counted as twice its forward (input and weight
    gradients): torch's counter treats a grouped (depthwise) convolution's backward as a dense one."""
    with FlopCounterMode(display=False) as counter:
        function()
    counts = {str(op): value for op, value in counter.get_flop_counts()["Global"].items()}
    total = float(counter.get_total_flops())
    if "aten.convolution_backward" in counts:
        total += 2 * counts.get("aten.convolution", 0) - counts["aten.convolution_backward"]
    return total


@dataclass
class Networks:
    tokenizer: torch.nn.Module
    captioner: torch.nn.Module  # the causal LM
    conditioner: torch.nn.Module  # the generator's frozen LLM
    generator: torch.nn.Module
    encoders: dict[str, tuple[torch.nn.Module, int]]


def build(preset: str) -> Networks:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from unilip.models.generator import GeneratorConfig, UniLIPGenerator
    from unilip.models.tokenizer import UniLIPTokenizer

    mllm_name, dit_name = PRESETS[preset]
    cfg = compose_config("train", ["task=generate", f"mllm={mllm_name}", f"dit={dit_name}", "run_dir=unused"])
    mllm, dit = instantiate(cfg.mllm), instantiate(cfg.dit)
    text = mllm.text_config()
    with META:
        tokenizer = UniLIPTokenizer(tokenizer_preset(preset))
        captioner = AutoModelForCausalLM.from_config(text)
        conditioner = AutoModel.from_config(text)
        generator = UniLIPGenerator(GeneratorConfig(text.to_dict(), dict(dit.transformer), 256, 6))
        encoders = {}
        for name, (kind, config, side) in ENCODERS.items():
            config = AutoConfig.for_model(kind, **config)
            encoders[name] = (AutoModel.from_config(config), side)
    for network in (tokenizer, captioner, conditioner, generator, *(m for m, _ in encoders.values())):
        network.requires_grad_(False)  # LoRA: backward computes activation gradients (the adapters' are negligible)
    return Networks(tokenizer, captioner, conditioner, generator, encoders)


def estimate(args) -> dict:
    nets = build(args.preset)
    b, n = args.images, args.images * args.group
    width = nets.captioner.config.hidden_size
    image_tokens = 256  # 448 px through the encoder: 16 x 16
    prompt = image_tokens + 24  # chat template and question around the image tokens
    caption = args.caption_tokens
    condition_tokens = 16 + caption + 256  # the generator's chat template, the caption, the 256 queries

    def embeds(rows, length, grad=False):
        return torch.empty(rows, length, width, device=META, requires_grad=grad)

    from transformers import DynamicCache

    def cache():  # an (empty) cache spares transformers' data-dependent mask checks, which meta tensors cannot run
        return DynamicCache(config=nets.captioner.config)

    def llm(rows, length, grad=False):
        return nets.captioner(inputs_embeds=embeds(rows, length, grad), past_key_values=cache(), use_cache=True)

    def llm_backward(rows, length):
        llm(rows, length, grad=True).logits.float().sum().backward()

    def decode_step(rows, length):
        past = cache()
        nets.captioner(inputs_embeds=embeds(rows, length - 1), past_key_values=past, use_cache=True)
        with FlopCounterMode(display=False) as counter:
            nets.captioner(inputs_embeds=embeds(rows, 1), past_key_values=past, use_cache=True)
        return float(counter.get_total_flops())

    def condition(rows):
        mask = torch.ones(rows, condition_tokens, dtype=torch.bool, device=META)
        hidden = nets.conditioner(
            inputs_embeds=embeds(rows, condition_tokens), past_key_values=cache()
        ).last_hidden_state
        nets.generator.connect(hidden, mask)

    def dit(rows, grad=False):
        latents = torch.empty(rows, 32, 16, 16, device=META, requires_grad=grad)
        cond = torch.empty(rows, condition_tokens, nets.generator.dit.config.caption_channels, device=META)
        mask = torch.ones(rows, condition_tokens, device=META)
        out = nets.generator(latents, torch.full((rows,), 500.0, device=META), cond, mask)
        if grad:
            out.float().sum().backward()

    def reward(rows):
        for model, side in nets.encoders.values():
            model(pixel_values=torch.empty(rows, 3, side, side, device=META))

    def features():
        nets.tokenizer.features(torch.empty(b, 3, 448, 448, device=META))

    def decoder():
        nets.tokenizer.decode(torch.empty(n, 32, 16, 16, device=META), (448, 448))

    with torch.no_grad():
        parts = {
            "image features (UniLIP encoder)": flops(features),
            "latent decoder (448 px)": flops(decoder),
            "reward encoders (sources + regenerations)": flops(lambda: reward(n + b)),
            "generator condition, guided (MLLM + connector)": flops(lambda: condition(2 * n)),
            "DiT step, guided": flops(lambda: dit(2 * n)),
        }
        full = flops(lambda: llm(n, prompt + caption))
    decode_mean = decode_step(n, prompt + caption // 2)
    stage1 = {
        "caption prompt (prefill)": flops(lambda: llm(n, prompt)),
        "caption tokens (decode, one by one)": decode_mean * caption,
        "log-probs: forward + backward": flops(lambda: llm_backward(n, prompt + caption)),
        "log-probs: recompute (gradient checkpointing)": full,
        "KL reference forward": full,
        "image features": parts["image features (UniLIP encoder)"],
        "render: condition": parts["generator condition, guided (MLLM + connector)"],
        "render: DiT x steps": parts["DiT step, guided"] * args.render_steps,
        "render: decode": parts["latent decoder (448 px)"],
        "reward": parts["reward encoders (sources + regenerations)"],
    }
    dit_train = flops(lambda: dit(2 * n, grad=True))
    greedy = flops(lambda: llm(b, prompt)) + decode_step(b, prompt + caption // 2) * caption
    stage2 = {
        "image features": parts["image features (UniLIP encoder)"],
        "caption (greedy, one per image)": greedy,
        "condition": parts["generator condition, guided (MLLM + connector)"],
        "SDE rollout: DiT x steps": parts["DiT step, guided"] * args.sde_steps,
        "decode": parts["latent decoder (448 px)"],
        "reward": parts["reward encoders (sources + regenerations)"],
        "policy: DiT forward + backward x steps": dit_train * args.sde_steps,
        "policy: recompute (gradient checkpointing) x steps": parts["DiT step, guided"] * args.sde_steps,
        "KL reference: DiT forward x steps": parts["DiT step, guided"] * args.sde_steps,
    }
    llm_bytes = 2 * sum(p.numel() for p in nets.captioner.parameters())  # bf16 weights read once per token
    layers = nets.captioner.config.num_hidden_layers
    decode_seconds = caption * (llm_bytes / (args.bandwidth * 1e9) + layers * args.launch_us * 1e-6)
    throughput = args.peak_tflops * 1e12 * args.mfu

    def summary(stage: dict, decode_tokens: int) -> dict:
        total = sum(stage.values())
        batched = total - stage.get("caption tokens (decode, one by one)", 0)
        seconds = batched / throughput + decode_seconds * (decode_tokens > 0)
        return {"tflops": {k: v / 1e12 for k, v in stage.items()}, "total_tflops": total / 1e12, "seconds": seconds}

    return {
        "preset": args.preset,
        "per_gpu": {"images": b, "group": args.group, "rollouts": n},
        "caption_tokens": caption,
        "render_steps": args.render_steps,
        "sde_steps": args.sde_steps,
        "assumptions": {
            "peak_tflops": args.peak_tflops,
            "mfu": args.mfu,
            "bandwidth_gb_s": args.bandwidth,
            "launch_us_per_layer_token": args.launch_us,
            "decode_seconds": decode_seconds,
        },
        "stage1": summary(stage1, caption),
        "stage2": summary(stage2, caption),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="unilip_1b")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--caption-tokens", type=int, default=256)
    parser.add_argument("--render-steps", type=int, default=20)
    parser.add_argument("--sde-steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 / H200: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the peak the batched passes reach")
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="GB/s of memory (H100 SXM: 3350)")
    parser.add_argument("--launch-us", type=float, default=60.0, help="kernel launches per layer per token, in us")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_third_party_noise()
    result = estimate(args)
    for stage in ("stage1", "stage2"):
        part = result[stage]
        print(f"{stage}: {part['total_tflops']:.0f} TFLOP per GPU step -> ~{part['seconds']:.1f} s")
        for name, value in sorted(part["tflops"].items(), key=lambda item: -item[1]):
            print(f"    {value:9.1f} TFLOP  {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
