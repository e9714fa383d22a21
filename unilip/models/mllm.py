"""The frozen multimodal side of generation: InternVL's language model reading the prompt (and the source
image of an edit) next to learnable queries, giving the DiT's "dual condition" (UniLIP Sec. 3.3).

    prompt (+ source image)  -> chat template -> ids; an edit gets <img> <IMG_CONTEXT> x N </img>; the
                             assistant turn opens with <img>, after which the Q queries follow (reference)
    input embeddings         text ids -> the LLM's table; image positions -> tokenizer.features(source)
                             (B, N, D), exactly what InternVL feeds its LLM; query positions -> the
                             generator's learnable queries (Q, D), appended after the prompt
    -> frozen LLM (causal)   last hidden states (B, L, D)
    -> dual condition        at image positions the hidden states are replaced by the features
                             themselves: queries carry the LLM's reading, image positions pixel detail

The vision side of the MLLM is the UniLIP tokenizer's encoder (the point of UniLIP: one encoder for
understanding and generation), so only the language model of the InternVL checkpoint is read here;
its own ViT is never loaded a second time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, InternVLConfig, PreTrainedConfig, PreTrainedTokenizerFast

from unilip.models.hub import enable_activation_checkpointing, load_strict, read_json, read_tensors, resolve_pretrained
from unilip.models.tokenizer import UniLIPTokenizer

log = logging.getLogger(__name__)

# Special tokens of InternVL3's chat format, in the order the byte-level test tokenizer numbers them.
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")


@dataclass
class PromptFormat:
    """How prompts become text (the UniLIP reference's InternVL chat format and task wording).

    `{prompt}` is the caption or edit instruction, `<image>` the source image's tokens. The `*_null`
    forms are the classifier-free-guidance condition: the task without its prompt; an edit keeps
    its source image, so guidance pushes towards the instruction, not away from the image.
    The chat ends with the assistant turn opened by `<img>` (InternVL3's id 151665): the queries
    follow it, as in the reference's training collator and inference prompt, and the whole text is
    tokenized in one piece, as the reference does (BPE merges across the prompt's edges stay the same).
    """

    chat: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<img>"
    text_to_image: str = "Generate an image: {prompt}"
    text_to_image_null: str = "Generate an image."
    edit: str = "Edit the image: {prompt}\n<image>"
    edit_null: str = "Edit the image.\n<image>"
    image_start: str = "<img>"
    image_context: str = "<IMG_CONTEXT>"
    image_end: str = "</img>"


@dataclass
class MLLMPreset:
    """An InternVL model as the generator uses it; presets live in `conf/mllm/`.

    Attributes:
        internvl: keyword arguments of transformers' `InternVLConfig`; its `text_config` is the LLM.
        weights: hub id or directory of an InternVL checkpoint in transformers format, or None for
            random weights drawn with `seed` (the tiny preset: tests, quick start). Never silently random.
        text_tokenizer: hub id or directory of its text tokenizer; None: the byte-level tokenizer
            (`byte_level_tokenizer`), which needs no files.
        source_size: side the source image of an edit is resized to before the encoder (448: 256 tokens).
        max_prompt_tokens: captions and instructions are cut to this many tokens.
    """

    internvl: dict[str, Any]
    weights: str | None = None
    text_tokenizer: str | None = None
    seed: int = 0
    source_size: int = 448
    max_prompt_tokens: int = 512
    prompts: PromptFormat = field(default_factory=PromptFormat)

    def __post_init__(self) -> None:
        self.internvl = dict(self.internvl)
        if isinstance(self.prompts, dict):
            self.prompts = PromptFormat(**self.prompts)

    def internvl_config(self) -> InternVLConfig:
        return InternVLConfig(**self.internvl)

    def text_config(self) -> PreTrainedConfig:
        config = self.internvl_config().text_config
        config._attn_implementation = "sdpa"
        config.use_cache = False
        return config

    @property
    def image_token_id(self) -> int:
        return self.internvl_config().image_token_id

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A text tokenizer with one token per UTF-8 byte (256) plus InternVL's special tokens (256-261).

    Built from nothing (no vocabulary file, no download), for the tiny preset.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def load_text_tokenizer(source: str | Path | None):
    """The text tokenizer of an InternVL checkpoint (hub id or directory); None: `byte_level_tokenizer()`."""
    if source is None:
        return byte_level_tokenizer()
    patterns = ("*.json", "*.txt", "*.model", "*.tiktoken")
    path = resolve_pretrained(source, what="text tokenizer", option="mllm.text_tokenizer", allow_patterns=patterns)
    return AutoTokenizer.from_pretrained(str(path))


def _check_text_config(path: Path, config: PreTrainedConfig) -> None:
    """Refuse a checkpoint whose LLM differs from the preset (the keys would not fit anyway; this says why)."""
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.exists():
        return
    theirs = read_json(config_file, what="InternVL config").get("text_config", {})
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    diffs = [
        f"{k}: {theirs[k]} != {getattr(config, k)}" for k in fields if k in theirs and theirs[k] != getattr(config, k)
    ]
    if diffs:
        raise ValueError(f"InternVL checkpoint '{path}' does not fit the mllm preset ({'; '.join(diffs)})")


def build_language_model(preset: MLLMPreset, device: str | torch.device | None = None) -> nn.Module:
    """The frozen LLM (transformers' model for `text_config`, e.g. `Qwen2Model`): embeddings, layers, final norm.

    Weights come from `preset.weights` (its `language_model.model.*` tensors, every key checked), or
    are drawn with `preset.seed` when it is None, so every build of a random preset is the same LLM.
    `device="meta"` allocates nothing (for counting).
    """
    config = preset.text_config()
    if str(device) == "meta":
        with torch.device("meta"):
            return AutoModel.from_config(config)
    if preset.weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.seed)
            model = AutoModel.from_config(config)
    else:
        path = resolve_pretrained(preset.weights, what="InternVL weights", option="mllm.weights")
        _check_text_config(path, config)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        prefix, tensors = read_tensors(path, ("language_model.model.", "model.language_model."))
        load_strict(model, tensors, what=f"'{path}' ({prefix}*)")
        # rotary frequencies are not in checkpoints: rebuild them off `meta`
        model.rotary_emb = type(model.rotary_emb)(config=config)
        log.info("loaded the language model of %s", path)
    if device is not None:
        model = model.to(device)
    return model.requires_grad_(False).eval()


class PromptBatch(NamedTuple):
    """Token ids of a batch of prompts with the queries appended, right-padded to L."""

    input_ids: torch.Tensor  # (B, L) long; query positions hold the pad id (their embeddings are the queries)
    attention_mask: torch.Tensor  # (B, L) bool, False on padding
    query_mask: torch.Tensor  # (B, L) bool, True on the Q query positions of each row
    image_mask: torch.Tensor  # (B, L) bool, True on the <IMG_CONTEXT> positions
    num_image_tokens: int = 0  # image_mask.sum(), counted on the host (reading it off the device would sync)

    def to(self, device: torch.device | str) -> PromptBatch:
        return self._replace(**{name: getattr(self, name).to(device) for name in self._fields[:4]})


class DualConditioner(nn.Module):
    """Frozen InternVL LLM + UniLIP encoder: prompts (+ source images) and queries -> (B, L, D) hidden states.

    Args:
        language_model: the frozen LLM (`build_language_model`).
        text_tokenizer: its tokenizer; must know the special tokens of `prompts`.
        tokenizer: the UniLIP tokenizer whose `features` are the MLLM's image features.
        image_token_id: id of `<IMG_CONTEXT>` (the InternVL config's `image_token_id`).
        prompts: chat format and task wording.
        source_size: side the source image is resized to (448 -> 16 x 16 = 256 image tokens).
        max_prompt_tokens: longer captions are cut.
    """

    def __init__(
        self,
        language_model: nn.Module,
        text_tokenizer,
        tokenizer: UniLIPTokenizer,
        image_token_id: int,
        prompts: PromptFormat,
        source_size: int = 448,
        max_prompt_tokens: int = 512,
    ):
        super().__init__()
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.text_tokenizer = text_tokenizer
        self.prompts, self.source_size, self.max_prompt_tokens = prompts, source_size, max_prompt_tokens
        self.gradient_checkpointing = False
        if language_model.config.hidden_size != tokenizer.config.feature_width:
            raise ValueError(
                f"the LLM's hidden size {language_model.config.hidden_size} is not the tokenizer's feature width "
                f"{tokenizer.config.feature_width}; pair the mllm preset with the tokenizer of the same size"
            )
        ids = {t: text_tokenizer.convert_tokens_to_ids(t) for t in (prompts.image_start, prompts.image_context)}
        ids[prompts.image_end] = text_tokenizer.convert_tokens_to_ids(prompts.image_end)
        if (
            ids[prompts.image_context] != image_token_id
            or None in ids.values()
            or text_tokenizer.unk_token_id in ids.values()
        ):
            raise ValueError(
                f"the text tokenizer maps {ids}, the InternVL config says image_token_id={image_token_id}; "
                "use the tokenizer that belongs to the checkpoint"
            )
        self.image_ids = (ids[prompts.image_start], ids[prompts.image_context], ids[prompts.image_end])
        self.pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
        multiple = tokenizer.config.input_multiple
        self.num_image_tokens = math.ceil(source_size / multiple) ** 2
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DualConditioner:
        # Frozen: always eval, except that transformers only checkpoints layers in train mode. The LLM
        # has no dropout (attention_dropout 0), so train mode changes nothing else.
        super().train(False)
        self.language_model.train(mode and self.gradient_checkpointing)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute LLM activations in backward (the queries' gradient passes through all its layers)."""
        if getattr(self.language_model.config, "attention_dropout", 0.0):
            raise ValueError("gradient checkpointing keeps the LLM in train mode; it must have no attention dropout")
        enable_activation_checkpointing(self.language_model)
        self.gradient_checkpointing = True

    # ------------------------------------------------------------------ prompts -> ids
    def text(self, prompt: str, edit: bool, null: bool) -> str:
        """The full text of one row before the queries (chat template, task wording, image tokens)."""
        kind = ("edit" if edit else "text_to_image") + ("_null" if null else "")
        task = getattr(self.prompts, kind).replace("{prompt}", self._cut(prompt))
        image = self.prompts.image_start + self.prompts.image_context * self.num_image_tokens + self.prompts.image_end
        return self.prompts.chat.replace("{content}", task.replace("<image>", image))

    def _cut(self, prompt: str) -> str:
        """A prompt of at most `max_prompt_tokens` tokens (longer ones cut at a token boundary)."""
        ids = self.text_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_prompt_tokens:
            return prompt
        return self.text_tokenizer.decode(ids[: self.max_prompt_tokens])

    def _ids(self, prompt: str, edit: bool, null: bool) -> list[int]:
        return self.text_tokenizer(self.text(prompt, edit, null), add_special_tokens=False)["input_ids"]

    def prepare(self, prompts: list[str], has_source, null, num_queries: int) -> PromptBatch:
        """Prompts -> `PromptBatch` (on CPU). `has_source`, `null`: (B,) bools (edit sample; CFG null condition)."""
        rows = [self._ids(p, bool(e), bool(n)) for p, e, n in zip(prompts, has_source, null, strict=True)]
        length = max(len(r) for r in rows) + num_queries
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(batch, length, dtype=torch.bool)
        queries = torch.zeros(batch, length, dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row) + num_queries] = True
            queries[i, len(row) : len(row) + num_queries] = True
        image_mask = input_ids == self.image_ids[1]
        return PromptBatch(input_ids, attention, queries, image_mask, int(image_mask.sum()))

    # ------------------------------------------------------------------ the condition
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(E, 3, H, W) in [0, 1] -> (E, N, D) post-projector features at `source_size`."""
        return source_image_features(self.tokenizer, images, self.source_size)

    def forward(self, batch: PromptBatch, queries: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """-> (B, L, D) dual-condition hidden states (meaningless at padding: mask them with `attention_mask`).

        `queries` (Q, D) keep their gradient (through the frozen LLM); `features` (E, N, D) are the
        source images of the E edit rows, in batch order.
        """
        embeds = self.language_model.get_input_embeddings()(batch.input_ids)
        image_mask = batch.image_mask.unsqueeze(-1)
        expected = batch.num_image_tokens
        if expected:
            if features is None or features.shape[0] * features.shape[1] != expected:
                got = 0 if features is None else features.shape[0] * features.shape[1]
                raise ValueError(f"{expected} image tokens in the prompts but {got} image features")
            embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
        # each row holds the Q queries in order; masked_scatter's backward is a masked_select, so the
        # queries' gradient is summed over rows deterministically (a gather's index_put is not, on CPU)
        rows = queries.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        embeds = embeds.masked_scatter(batch.query_mask.unsqueeze(-1), rows)
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask.long(), use_cache=False
        ).last_hidden_state
        if expected:  # the dual condition: the features themselves at image positions (pixel detail)
            hidden = hidden.masked_scatter(image_mask, features.to(hidden.dtype))
        return hidden


@torch.no_grad()
def source_image_features(tokenizer: UniLIPTokenizer, images: torch.Tensor, source_size: int) -> torch.Tensor:
    """An edit's source images (E, 3, H, W) in [0, 1] -> (E, N, D) encoder features at `source_size` x `source_size`
    (resized whole, bicubic with antialiasing, if they come at another size): what the LLM reads."""
    if images.shape[-2:] != (source_size, source_size):
        images = F.interpolate(
            images, size=(source_size, source_size), mode="bicubic", align_corners=False, antialias=True
        ).clamp(0, 1)
    return tokenizer.features(images)


def build_conditioner(preset: MLLMPreset, tokenizer: UniLIPTokenizer, language_model: nn.Module | None = None):
    """A `DualConditioner` for `preset` over `tokenizer` (frozen), building the LLM unless given."""
    tokenizer.requires_grad_(False).eval()
    return DualConditioner(
        language_model if language_model is not None else build_language_model(preset),
        load_text_tokenizer(preset.text_tokenizer),
        tokenizer,
        image_token_id=preset.image_token_id,
        prompts=preset.prompts,
        source_size=preset.source_size,
        max_prompt_tokens=preset.max_prompt_tokens,
    )
