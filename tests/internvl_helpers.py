"""A tiny InternVL checkpoint with its processor files, laid out as OpenGVLab/InternVL3-1B-hf is: what
`python -m unilip.export` turns into a checkpoint that answers questions (the understanding and demo tests)."""

import json

import torch

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
