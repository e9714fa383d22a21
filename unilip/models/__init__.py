"""Networks only: the UniLIP tokenizer and its encoders (`encoders/`), the discriminator, the generator (queries,
connector, SANA DiT), the frozen InternVL conditioner, the captioner, latent spaces, LoRA, toy builders; `hub.py`
loads their own saved formats strictly, `presets.py` finds the configs.

May import the foundation (`unilip.errors`, `unilip.logs`) and nothing else of unilip: no training, tasks or
Lightning, and not `unilip.pretrained` (the code that moves weights in and out of other formats, which imports
these networks). `build_tokenizer` and `load_tokenizer` live there.
"""

from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer

__all__ = ["TokenizerConfig", "UniLIPTokenizer"]
