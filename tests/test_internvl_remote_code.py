"""An export into the original format runs in InternVL's own remote code, as VLMEvalKit runs it (opt-in).

    UNILIP_INTERNVL=/path/to/InternVL pytest tests/test_internvl_remote_code.py -m slow

UNILIP_INTERNVL is a checkout of github.com/OpenGVLab/InternVL. The hub's original checkpoints
(OpenGVLab/InternVL3-1B) carry the same files as its `internvl_chat/internvl/model/internvl_chat/*.py` and
`internvl_chat/internvl/conversation.py`, with relative imports and without the InternLM2 / Phi-3 / LoRA
imports; the copies made here are patched to that. Their `modeling_intern_vit.py` imports einops (a dev
dependency) and timm.
"""

import os
import re
from pathlib import Path

import pytest
import torch

from tests.test_internvl_original import REMOTE_CODE, write_original_base
from unilip.export import main as export_main

INTERNVL = os.environ.get("UNILIP_INTERNVL")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not INTERNVL, reason="set UNILIP_INTERNVL to a checkout of OpenGVLab/InternVL"),
]


def remote_code(name: str) -> str:
    """One of the hub checkpoint's python files, from the checkout, with the hub's imports."""
    package = Path(INTERNVL) / "internvl_chat" / "internvl"
    source = package / ("conversation.py" if name == "conversation.py" else f"model/internvl_chat/{name}")
    if not source.is_file():
        pytest.skip(f"{source} is missing: UNILIP_INTERNVL must be a full checkout of OpenGVLab/InternVL")
    text = source.read_text()
    text = re.sub(r"^from (internvl\.model\.(internlm2|phi3)\.|peft ).*$", "", text, flags=re.MULTILINE)
    return text.replace("from internvl.conversation import", "from .conversation import")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny original-format base with InternVL's real remote code, and the tokenizer exported into it in
    float32 (InternVL's code runs on the CPU in float32 here)."""
    pytest.importorskip("einops", reason="InternVL's modeling_intern_vit.py imports einops (pip install einops)")
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    root = tmp_path_factory.mktemp("remote")
    torch.manual_seed(0)
    tokenizer = UniLIPTokenizer(tokenizer_preset("tiny")).eval()
    tokenizer.save_pretrained(root / "tokenizer")
    base = write_original_base(tokenizer, root / "InternVL3-1B")
    for name in REMOTE_CODE:
        (base / name).write_text(remote_code(name))
    out = root / "InternVL3-1B-UniLIP"
    export_main(["--tokenizer", str(root / "tokenizer"), "--base", str(base), "--out", str(out), "--dtype", "float32"])
    return tokenizer, out


def _load(out):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        str(out), trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "InternVLChatModel"  # the checkpoint's own class, not transformers'
    return model.eval()


def test_internvls_own_code_computes_the_tokenizers_features(exported):
    tokenizer, out = exported
    model = _load(out)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.extract_feature(tokenizer.encoder.normalise(images))
        ours = tokenizer.features(images)
    assert theirs.shape == ours.shape == (2, 64, 48)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_chat_answers_from_the_tokenizers_features(exported):
    """`model.chat(tokenizer, pixel_values, question, generation_config)`, VLMEvalKit's call
    (vlmeval/vlm/internvl/internvl_chat.py), with its tokenizer loaded its way (`use_fast=False`)."""
    from transformers import AutoTokenizer

    tokenizer, out = exported
    model = _load(out)
    text = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True, use_fast=False)
    seen = []
    model.mlp1.register_forward_hook(lambda module, inputs, output: seen.append(output))
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    answer = model.chat(
        text,
        pixel_values=tokenizer.encoder.normalise(images),
        question="What is in the picture?",
        generation_config=dict(do_sample=False, max_new_tokens=4, top_p=None, num_beams=1),
    )
    assert isinstance(answer, str)
    with torch.no_grad():
        torch.testing.assert_close(seen[0], tokenizer.features(images), rtol=0, atol=1e-5)
