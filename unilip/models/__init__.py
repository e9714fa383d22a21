"""Models: the UniLIP tokenizer (and, later, the generator). None of them know Lightning."""

from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer, build_tokenizer

__all__ = ["TokenizerConfig", "UniLIPTokenizer", "build_tokenizer"]
