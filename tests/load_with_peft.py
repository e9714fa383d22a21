"""Run as a script in a fresh process: load a saved captioner's adapters the way peft users do, onto transformers'
InternVL, and write its logits.

    python tests/load_with_peft.py <internvl_dir> <captioner_dir> <inputs.safetensors> <out.safetensors>

inputs: `input_ids` and `pixel_values`. Writes `adapted` (the logits of `PeftModel.from_pretrained(base, folder)`),
`base` (the same with the adapters disabled) and `adapted_modules` (how many modules peft adapted). Imports
nothing of unilip, so that only transformers and peft read the folder.
"""

import sys

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration


def main(internvl_dir: str, captioner_dir: str, inputs_file: str, out_file: str) -> None:
    base = InternVLForConditionalGeneration.from_pretrained(internvl_dir).eval()
    model = PeftModel.from_pretrained(base, captioner_dir).eval()
    inputs = load_file(inputs_file)
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
    count = sum(isinstance(module, BaseTunerLayer) for module in model.modules())
    save_file({"adapted": adapted, "base": plain, "adapted_modules": torch.tensor(count)}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
