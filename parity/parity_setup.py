"""Shared set-up of the parity checks against the authors' code (`parity_generation.py`, `parity_tokenizer.py`).

The reference's side runs in its own Python (it pins transformers 4.52 / diffusers 0.32; give it with
`--reference-python`) and imports the authors' modules from the checkout given with `--reference`;
nothing of theirs is copied here. It builds every pretrained input the reference's constructors read,
with random weights at the chosen size, in the formats those constructors expect:

    internvl_hf/  InternVL3 in transformers' format (+ a text tokenizer with InternVL3's special ids)
    internvl/     the original InternVL layout their code loads with trust_remote_code: a small shell
                  model (written here) holding InternViT (`modeling_intern_vit.py` of the OpenGVLab
                  InternVL checkout given with `--internvl`, copied at run time) and `mlp1`
    dcae/         an AutoencoderDC (f32c32, the SANA 1.1 decoder's shape)
    sana/         SANA's transformer/ and scheduler/ (DPM-Solver++ with flow sigmas, as SANA ships it)
    unilip.pth    the tokenizer as the authors release it (their DC_AE_ViT_Stage2's state dict)

Sizes come from this project's presets (conf/), read as plain YAML: `unilip_1b` (InternVL3-1B,
SANA-0.6B, the UniLIP-1B tokenizer) or `tiny`. This module imports nothing of `unilip`: the authors'
package has the same name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[1] / "conf"
INTERNVIT_FILES = ("configuration_intern_vit.py", "modeling_intern_vit.py")
INTERNVIT_DIR = "internvl_chat/internvl/model/internvl_chat"
# InternVL3's special tokens and their ids (Qwen2.5 vocabulary + InternVL's additions)
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<img>": 151665,
    "</img>": 151666,
    "<IMG_CONTEXT>": 151667,
}
VOCAB_SIZE = 151674


def sizes(preset: str) -> dict[str, Any]:
    """The architecture of `preset` (unilip_1b or tiny) from this project's YAML presets."""
    from omegaconf import OmegaConf

    names = {"unilip_1b": ("unilip_1b", "internvl3_1b", "sana_600m"), "tiny": ("tiny", "tiny", "tiny")}[preset]
    model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{names[0]}.yaml").config)
    mllm = OmegaConf.to_container(OmegaConf.load(CONF / "mllm" / f"{names[1]}.yaml"))
    dit = OmegaConf.to_container(OmegaConf.load(CONF / "dit" / f"{names[2]}.yaml"))
    text = dict(mllm["internvl"]["text_config"], vocab_size=VOCAB_SIZE)  # InternVL3's ids everywhere
    vision = dict(model["vision"], image_size=448)  # the edit source's size (256 image tokens)
    return {
        "vision": vision,
        "text": text,
        "llm_hidden": model["llm_hidden_size"],
        "dit": dit["transformer"],
        "decoder": model["decoder"],
    }


def text_tokenizer():
    """A byte-level BPE tokenizer with InternVL3's special tokens at their real ids (no vocabulary download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab |= {f"<|filler_{i}|>": i for i in range(len(alphabet), min(SPECIAL_IDS.values()))}
    vocab |= SPECIAL_IDS
    used = set(vocab.values())
    vocab |= {f"<|unused_{i}|>": i for i in range(VOCAB_SIZE) if i not in used}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right")
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.add_tokens(list(SPECIAL_IDS), special_tokens=True)
    return tokenizer


SHELL_CONFIG = """
from transformers import PretrainedConfig
from .configuration_intern_vit import InternVisionConfig


class ShellConfig(PretrainedConfig):
    model_type = "internvl_shell"

    def __init__(self, vision_config=None, llm_config=None, use_flash_attn=False, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.vision_config.use_flash_attn = use_flash_attn
        self.llm_config = PretrainedConfig(**(llm_config or {}))

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
"""
SHELL_MODEL = '''
from torch import nn
from transformers import PreTrainedModel
from .configuration_shell import ShellConfig
from .modeling_intern_vit import InternVisionModel


class ShellModel(PreTrainedModel):
    """InternVL's vision_model and mlp1 (what the UniLIP code reads of an InternVL checkpoint)."""

    config_class = ShellConfig

    def __init__(self, config, use_flash_attn=False):
        super().__init__(config)
        config.vision_config.use_flash_attn = use_flash_attn
        vit, llm = config.vision_config.hidden_size, config.llm_config.hidden_size
        self.vision_model = InternVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(nn.LayerNorm(vit * 4), nn.Linear(vit * 4, llm), nn.GELU(), nn.Linear(llm, llm))
'''


def _free() -> None:
    import gc

    gc.collect()


def build_inputs(work: Path, preset: str, reference: Path, internvl: Path, seed: int = 0) -> dict[str, Path]:
    """Write the random-weight inputs the reference's constructors read (reference's Python). Idempotent."""
    import torch

    size = sizes(preset)
    work.mkdir(parents=True, exist_ok=True)
    paths = {name: work / name for name in ("internvl_hf", "internvl", "dcae", "sana", "unilip.pth")}
    torch.manual_seed(seed)
    if not (paths["internvl_hf"] / "tokenizer.json").exists():
        from safetensors.torch import save_file
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        vision = dict(size["vision"], image_size=[448, 448], patch_size=[14, 14])
        config = InternVLConfig(
            vision_config=vision,
            text_config=size["text"],
            image_token_id=SPECIAL_IDS["<IMG_CONTEXT>"],
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
        model = InternVLForConditionalGeneration(config)
        # the hub's InternVL3-hf key layout (what AutoModel and InternVLForConditionalGeneration both read)
        legacy = {
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
        state = {}
        for key, value in model.state_dict().items():
            prefix = next(p for p in legacy if key.startswith(p))
            state[legacy[prefix] + key[len(prefix) :]] = value.contiguous()
        paths["internvl_hf"].mkdir(parents=True, exist_ok=True)
        save_file(state, str(paths["internvl_hf"] / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(paths["internvl_hf"])
        text_tokenizer().save_pretrained(paths["internvl_hf"])
        del model, state
        _free()
    if not (paths["internvl"] / "config.json").exists():
        target = paths["internvl"]
        target.mkdir(parents=True, exist_ok=True)
        for name in INTERNVIT_FILES:
            shutil.copy(internvl / INTERNVIT_DIR / name, target / name)
        (target / "configuration_shell.py").write_text(SHELL_CONFIG)
        (target / "modeling_shell.py").write_text(SHELL_MODEL)
        (target / "__init__.py").write_text("")
        sys.path.insert(0, str(work))
        from internvl.configuration_shell import ShellConfig
        from internvl.modeling_shell import ShellModel

        v = size["vision"]
        vision = {
            "hidden_size": v["hidden_size"],
            "num_hidden_layers": v["num_hidden_layers"],
            "num_attention_heads": v["num_attention_heads"],
            "intermediate_size": v["intermediate_size"],
            "image_size": 448,
            "patch_size": 14,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": v["layer_norm_eps"],
            "hidden_act": "gelu",
            "initializer_factor": v["layer_scale_init_value"],
            "drop_path_rate": 0.0,
        }
        config = ShellConfig(vision_config=vision, llm_config={"hidden_size": size["llm_hidden"]})
        config.auto_map = {"AutoConfig": "configuration_shell.ShellConfig", "AutoModel": "modeling_shell.ShellModel"}
        model = ShellModel(config)
        with torch.no_grad():  # InternViT's LayerScale starts at initializer_factor: make it matter
            for name, param in model.named_parameters():
                if name.endswith((".ls1", ".ls2")):
                    param.uniform_(0.05, 0.5)
        model.save_pretrained(target, safe_serialization=True)
        _free()
    if not (paths["dcae"] / "config.json").exists():
        from diffusers import AutoencoderDC

        d = size["decoder"]
        stages = len(d["block_out_channels"])
        AutoencoderDC(
            in_channels=3,
            latent_channels=32,
            attention_head_dim=d["attention_head_dim"],
            encoder_block_types=d["block_type"],
            decoder_block_types=d["block_type"],
            encoder_block_out_channels=d["block_out_channels"],
            decoder_block_out_channels=d["block_out_channels"],
            encoder_layers_per_block=[1] * stages,
            decoder_layers_per_block=d["layers_per_block"],
            encoder_qkv_multiscales=d["qkv_multiscales"],
            decoder_qkv_multiscales=d["qkv_multiscales"],
            upsample_block_type=d["upsample_block_type"],
            decoder_norm_types=d["norm_type"],
            decoder_act_fns=d["act_fn"],
            scaling_factor=0.41407,
        ).save_pretrained(paths["dcae"])
        _free()
    if not (paths["sana"] / "scheduler" / "scheduler_config.json").exists():
        from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel

        SanaTransformer2DModel(**size["dit"]).save_pretrained(paths["sana"] / "transformer")
        scheduler = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            solver_order=2,
            final_sigmas_type="zero",
            lower_order_final=True,
        )
        scheduler.save_pretrained(paths["sana"] / "scheduler")
        _free()
    if not paths["unilip.pth"].exists():
        tokenizer = reference_tokenizer("stage2", work, reference)
        torch.manual_seed(seed + 1)
        with torch.no_grad():  # the bottleneck's LayerNorms and biases away from their init, as trained
            for name, param in tokenizer.named_parameters():
                if name.startswith(("down_blocks", "down_mlp")):
                    param.add_(torch.randn_like(param) * 0.02)
        torch.save(tokenizer.state_dict(), paths["unilip.pth"])
        del tokenizer
        _free()
    return paths


TOKENIZER_CLASSES = {
    "stage2": ("modeling.dc_ae_vit_stage2", "DC_AE_ViT_Stage2"),
    "stage2_448": ("modeling.dc_ae_vit_stage2_448", "DC_AE_ViT_Stage2_448"),
    "stage2_pad": ("modeling.dc_ae_vit_stage2_pad", "DC_AE_ViT_Stage2_Pad"),
}


def reference_tokenizer(kind: str, work: Path, reference: Path):
    """The authors' tokenizer class `kind` built by its own constructor over the inputs in `work`."""
    import importlib

    from omegaconf import OmegaConf

    sys.path.insert(0, str(reference / "tokenizer"))
    module, name = TOKENIZER_CLASSES[kind]
    config = OmegaConf.create(
        {
            "model": {
                "embed_dim": 32,
                "patch_size": 14,
                "mllm_path": str(work / "internvl"),
                "dc_ae_path": str(work / "dcae"),
                "stage1_ckpt": "",
            },
            "dataset": {
                "preprocessing": {"normalize_mean": [0.485, 0.456, 0.406], "normalize_std": [0.229, 0.224, 0.225]}
            },
        }
    )
    return getattr(importlib.import_module(module), name)(config).eval()


def run_reference(script: Path, python: str, args: list[str], work: Path) -> None:
    """Run `script --side reference ...` under the reference's Python, in `work` (their code writes debug files)."""
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [python, str(script), "--side", "reference", *args]
    print("reference side:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=work, env=env)


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def parity_main(
    argv: list[str] | None,
    script: Path,
    description: str,
    reference_side: Callable[[argparse.Namespace], Any],
    ours_side: Callable[[argparse.Namespace], dict[str, Any]],
    report_name: str,
) -> dict | None:
    """The command line both parity scripts share: `--side both` runs `script --side reference` under the
    reference's Python, then our side here, and writes `work/report_name`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reference", type=Path, required=True, help="checkout of github.com/nnnth/UniLIP")
    parser.add_argument("--internvl", type=Path, required=True, help="checkout of github.com/OpenGVLab/InternVL")
    parser.add_argument("--reference-python", default=sys.executable, help="a Python with the reference's pins")
    parser.add_argument("--work", type=Path, required=True, help="directory for the inputs, weights and tensors")
    parser.add_argument("--preset", choices=["unilip_1b", "tiny"], default="unilip_1b")
    parser.add_argument("--side", choices=["both", "reference", "ours"], default="both")
    args = parser.parse_args(argv)
    args.work, args.reference, args.internvl = args.work.resolve(), args.reference.resolve(), args.internvl.resolve()
    if args.side == "reference":
        return reference_side(args)
    if args.side == "both":
        args.work.mkdir(parents=True, exist_ok=True)
        common = ["--reference", str(args.reference), "--internvl", str(args.internvl), "--work", str(args.work)]
        run_reference(script, args.reference_python, [*common, "--preset", args.preset], args.work)
    sys.path.insert(0, str(script.resolve().parents[1]))
    report = {"preset": args.preset, **ours_side(args)}
    write_report(args.work / report_name, report)
    return report
