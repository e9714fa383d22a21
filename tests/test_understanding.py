"""Understanding after the swap: an exported checkpoint (`python -m unilip.export`) answers through
lmms-eval's own InternVL model class, unchanged, with the trained encoder feeding the language model.

lmms-eval is not a dev dependency (its requirements pin wandb and pull ~50 packages); the test runs where
it is importable, e.g. after `pip install lmms-eval --no-deps loguru accelerate evaluate pytz`."""

import json

import pytest
import torch
from PIL import Image
from skimage import data as skdata

lmms_internvl = pytest.importorskip(
    "lmms_eval.models.chat.internvl_hf", reason="lmms-eval is not installed (see the module docstring)"
)

# InternVL3-hf's chat format, reduced to what one question about one image needs
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_internvl_with_processor(tokenizer, directory):
    """A tiny InternVL checkpoint laid out as OpenGVLab/InternVL3-1B-hf is: weights, text tokenizer with
    InternVL's image tokens, image / video processors and chat template."""
    from transformers import (
        AutoTokenizer,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from unilip.models.mllm import byte_level_tokenizer

    text = byte_level_tokenizer()
    text.add_tokens(["<video>"], special_tokens=True)
    text.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = "<|im_end|>"
    config["extra_special_tokens"] = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    config_file.write_text(json.dumps(config))
    text = AutoTokenizer.from_pretrained(directory)
    vision = tokenizer.config.vision
    side = vision["image_size"]
    image_processor = GotOcr2ImageProcessor(
        size={"height": side, "width": side},
        crop_to_patches=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    tokens_per_tile = int((side // vision["patch_size"]) ** 2 * tokenizer.config.downsample_ratio**2)
    processor = InternVLProcessor(
        image_processor, text, InternVLVideoProcessor(), image_seq_length=tokens_per_tile, chat_template=CHAT_TEMPLATE
    )
    internvl = InternVLConfig(
        vision_config=vision,
        text_config=dict(
            model_type="qwen2",
            hidden_size=tokenizer.config.llm_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=len(text),
        ),
        image_token_id=text.context_image_token_id,
        downsample_ratio=tokenizer.config.downsample_ratio,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    InternVLForConditionalGeneration(internvl).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_an_exported_checkpoint_answers_through_lmms_evals_internvl_class(tiny_tokenizer, tmp_path):
    from lmms_eval.api.instance import Instance

    from unilip.export import main as export_main

    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    base = tiny_internvl_with_processor(tiny_tokenizer, tmp_path / "base")
    export_main(["--tokenizer", str(tmp_path / "tokenizer"), "--base", str(base), "--out", str(tmp_path / "exported")])

    model = lmms_internvl.InternVLHf(
        pretrained=str(tmp_path / "exported"), device="cpu", device_map="cpu", max_patches=1
    )
    seen = {}

    def capture(module, inputs, output):  # what the language model receives for the image
        seen["pixels"], seen["features"] = inputs[0], output

    projector = model.model.model.multi_modal_projector
    projector.register_forward_hook(capture)
    tower = model.model.model.vision_tower
    tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(values=kwargs.get("pixel_values", args[0] if args else None)),
        with_kwargs=True,
    )

    doc = {"image": Image.fromarray(skdata.astronaut()), "question": "What is in the picture?"}
    model.task_dict = {"demo": {"test": [doc]}}

    def messages(d):
        return [
            {"role": "user", "content": [{"type": "image", "url": d["image"]}, {"type": "text", "text": d["question"]}]}
        ]

    request = Instance("generate_until", ("", messages, {"max_new_tokens": 4}, 0, "demo", "test"), 0,
                       {"task": "demo", "doc_id": 0, "repeats": 1})  # fmt: skip
    (answer,) = model.generate_until([request])
    assert answer.token_counts.output_tokens == 4  # it generated (lmms-eval turns failures into "")
    # the features it conditioned on are the trained encoder's, for the image lmms-eval's processor made
    images = seen["values"].float() * tiny_tokenizer.image_std + tiny_tokenizer.image_mean  # back to [0, 1]
    with torch.no_grad():
        ours = tiny_tokenizer.features(images)
    theirs = seen["features"].float().reshape(ours.shape)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min() > 0.99  # the model runs in bfloat16, as lmms-eval loads it
