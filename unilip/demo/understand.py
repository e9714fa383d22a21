"""The Understand tab: a question about an image, answered by an InternVL checkpoint whose vision encoder is the
trained tokenizer's (`python -m unilip.export`), through transformers' own InternVL classes and the checkpoint's
processor and chat template, greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from unilip.errors import ConfigError


@dataclass
class InternVL:
    model: torch.nn.Module
    processor: object


def load_internvl(path: Path, device: str, dtype: str = "float32") -> InternVL:
    """An InternVL checkpoint in the transformers (-hf) format, with its processor files."""
    import json

    from transformers import AutoProcessor, InternVLForConditionalGeneration

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "internvl":
        raise ConfigError(
            f"{path} is an InternVL checkpoint in the original remote-code format (model_type={model_type!r}); "
            "the demo reads the transformers format: export again with --base OpenGVLab/InternVL3-1B-hf"
        )
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{path} has no usable processor files ({error}); export from a base that has them "
            "(e.g. OpenGVLab/InternVL3-1B-hf), which the export copies"
        ) from None
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(f"{path} has no chat template; export from a base that has one (OpenGVLab/InternVL3-1B-hf)")
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
    return InternVL(model.to(device).eval(), processor)


@torch.no_grad()
def answer(internvl: InternVL, image: Image.Image, question: str, max_new_tokens: int = 64) -> str:
    """The checkpoint's greedy answer to `question` about `image` (one image, one turn)."""
    if not question.strip():
        raise ValueError("write a question")
    if not 1 <= max_new_tokens <= 1024:
        raise ValueError(f"max new tokens {max_new_tokens}: choose 1 to 1024")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = internvl.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    device = next(internvl.model.parameters()).device
    dtype = next(internvl.model.parameters()).dtype
    inputs = {k: v.to(device, dtype=dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}
    output = internvl.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return internvl.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
