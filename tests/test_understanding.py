"""Understanding after the swap: an exported checkpoint (`python -m unilip.export`) answers through
lmms-eval's own InternVL model class, unchanged, with the trained encoder feeding the language model.

lmms-eval is not a dev dependency (its requirements pin wandb and pull ~50 packages); the test runs where
it is importable, e.g. after `pip install lmms-eval --no-deps loguru accelerate evaluate pytz`."""

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tests.internvl_helpers import tiny_internvl_with_processor

lmms_internvl = pytest.importorskip(
    "lmms_eval.models.chat.internvl_hf", reason="lmms-eval is not installed (see the module docstring)"
)


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
