"""The understanding half of UniLIP as one auto-encoder's encoder (UAE): InternVL's language model reads an
image through the UniLIP encoder and writes its caption.

    image (B, 3, H, W) in [0, 1] -> resized to the MLLM's input side (448: 256 tokens) -> tokenizer.features
    prompt ids                   chat template; <img> <IMG_CONTEXT> x N </img> where the image goes
    input embeddings             text ids -> the LLM's table; image positions -> the features (as InternVL)
    -> LLM + LM head             next-token logits; the caption is sampled (or greedy) up to the stop token

This is what transformers' `InternVLForConditionalGeneration` computes for one 448 x 448 tile, with the vision
tower and projector being the UniLIP tokenizer's (shared with the generator, never loaded twice). Sampling
draws one uniform number per row and step from a host generator (inverse CDF), so captions are reproducible
and resumable on any device. Banned from captions: image tokens and ids past the text tokenizer's vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from unilip.models.hub import (
    WeightsNotFoundError,
    enable_activation_checkpointing,
    load_safetensors,
    load_strict,
    read_json,
    read_tensors,
    resolve_pretrained,
)
from unilip.models.lora import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    LoRASpec,
    add_lora,
    load_adapters,
    load_peft_adapter,
    save_peft_adapter,
)
from unilip.models.mllm import MLLMPreset, build_language_model, load_text_tokenizer
from unilip.models.tokenizer import UniLIPTokenizer

log = logging.getLogger(__name__)

FORMAT = "unilip-captioner"
CONFIG_NAME = "captioner.json"
LEGACY_WEIGHTS_NAME = "adapter.safetensors"  # the adapters, in the LLM's own names, before they were a peft folder
TEXT_TOKENIZER_DIR = "text_tokenizer"
# The captioner's LLM (a causal LM: `model.*` body, `lm_head`) inside transformers' InternVLForConditionalGeneration,
# the base its adapters are saved for: `PeftModel.from_pretrained(InternVLForConditionalGeneration..., folder)`.
INTERNVL_NAMES = {"model.": "model.language_model.", "lm_head": "lm_head"}


@dataclass
class CaptionFormat:
    """The question asked about the image, in InternVL's chat format; `{image}` is where its tokens go."""

    prompt: str = "Describe this image in detail."
    chat: str = "<|im_start|>user\n{image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    stop: str = "<|im_end|>"
    image_start: str = "<img>"
    image_context: str = "<IMG_CONTEXT>"
    image_end: str = "</img>"


class CaptionBatch(NamedTuple):
    """Sampled captions as token ids."""

    tokens: torch.Tensor  # (B, T) long; after a caption's end: the pad id
    mask: torch.Tensor  # (B, T) bool: the caption's tokens, its stop token included
    finished: torch.Tensor  # (B,) bool: it ended with the stop token (not cut at max_new_tokens)
    log_probs: torch.Tensor  # (B, T) log-probability of each token under the sampling policy (0 on padding)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def repeat(self, times: int) -> CaptionBatch:
        """Each row `times` times in a row (B * times rows)."""
        return CaptionBatch(*(t.repeat_interleave(times, dim=0) for t in self))


def build_causal_language_model(preset: MLLMPreset) -> nn.Module:
    """InternVL's language model with its LM head (e.g. `Qwen2ForCausalLM`), frozen, in eval mode.

    From `preset.weights` (`language_model.model.*` and `language_model.lm_head.*`, every key checked; a
    tied head needs none), or random with `preset.seed`: then the body is exactly the generator's
    conditioner LLM (`build_language_model` of the same preset) and the head is drawn with seed + 1.
    """
    config = preset.text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head: dict[str, torch.Tensor] = {}
    if preset.weights is None:
        body = build_language_model(preset).state_dict()
        if not config.tie_word_embeddings:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(preset.seed + 1)
                layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            head = {"weight": layer.weight.detach()}
        where = f"random LLM (seed {preset.seed})"
    else:
        path = resolve_pretrained(preset.weights, what="InternVL weights", option="mllm.weights")
        _, body = read_tensors(path, ("language_model.model.", "model.language_model."))
        if not config.tie_word_embeddings:
            _, head = read_tensors(path, ("language_model.lm_head.", "lm_head."))
        where = f"'{path}'"
    state = {f"model.{k}": v for k, v in body.items()} | {f"lm_head.{k}": v for k, v in head.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_strict(model, state, what=f"the language model and LM head of {where}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # not in checkpoints: off `meta`
    return model.requires_grad_(False).eval()


class Captioner(nn.Module):
    """InternVL's LLM (+ LM head) over the UniLIP encoder: images -> captions, and their log-probabilities.

    Args:
        language_model: a causal LM (`build_causal_language_model`); LoRA adapters may be added to it.
        text_tokenizer: its text tokenizer (knows the chat format's special tokens).
        tokenizer: the UniLIP tokenizer whose `features` are the image tokens (frozen, shared).
        image_token_id: id of `<IMG_CONTEXT>`.
        caption_format: the question and chat format.
        image_size: side the image is resized to (448: 16 x 16 = 256 image tokens).
        max_new_tokens: captions are cut at this length (and then not `finished`).
        temperature: of the sampling distribution (its log-probabilities are the policy's).

    `synced` (set when the LLM is sharded over ranks, FSDP): sampling runs the same number of LLM forward
    passes on every rank, until every rank's captions are done, as FSDP's gathers are collective.
    """

    def __init__(
        self,
        language_model: nn.Module,
        text_tokenizer,
        tokenizer: UniLIPTokenizer,
        image_token_id: int,
        caption_format: CaptionFormat | None = None,
        image_size: int = 448,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.text_tokenizer = text_tokenizer
        self.format = caption_format or CaptionFormat()
        self.image_size, self.max_new_tokens, self.temperature = image_size, max_new_tokens, temperature
        self.gradient_checkpointing = False
        self.synced = False
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (greedy captions: sample(..., greedy=True))")
        fmt = self.format
        ids = {t: text_tokenizer.convert_tokens_to_ids(t) for t in (fmt.image_start, fmt.image_context, fmt.image_end)}
        self.stop_id = text_tokenizer.convert_tokens_to_ids(fmt.stop)
        if ids[fmt.image_context] != image_token_id or None in (*ids.values(), self.stop_id):
            raise ValueError(
                f"the text tokenizer maps {ids} and stop {fmt.stop!r} to {self.stop_id}, the InternVL config says "
                f"image_token_id={image_token_id}; use the tokenizer that belongs to the checkpoint"
            )
        vocab = language_model.config.vocab_size
        banned = torch.zeros(vocab, dtype=torch.bool)
        banned[len(text_tokenizer) :] = True  # ids the text tokenizer cannot write
        banned[list(ids.values())] = True
        self.register_buffer("banned", banned, persistent=False)
        self.pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else self.stop_id
        self.num_image_tokens = (image_size // tokenizer.config.input_multiple) ** 2
        image = fmt.image_start + fmt.image_context * self.num_image_tokens + fmt.image_end
        text = fmt.chat.replace("{image}", image).replace("{prompt}", fmt.prompt)
        prompt = torch.tensor(text_tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        self.register_buffer("prompt_ids", prompt, persistent=False)
        self.image_positions = (prompt == image_token_id).nonzero().squeeze(1).tolist()
        if len(self.image_positions) != self.num_image_tokens:
            count = len(self.image_positions)
            raise ValueError(f"the caption prompt holds {count} image tokens, not {self.num_image_tokens}")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LLM's activations in `token_log_probs`' backward (transformers checkpoints only in
        train mode, which it is in there alone: sampling keeps its cache; the LLM has no dropout)."""
        if getattr(self.language_model.config, "attention_dropout", 0.0):
            raise ValueError("gradient checkpointing runs the LLM in train mode; it must have no attention dropout")
        enable_activation_checkpointing(self.language_model)
        self.gradient_checkpointing = True

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D) the UniLIP encoder's features at `image_size` (the whole image)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            side = (self.image_size, self.image_size)
            images = F.interpolate(images.float(), size=side, mode="bicubic", antialias=True).clamp(0, 1)
        return self.tokenizer.features(images)

    def _embeds(self, features: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt (image positions: `features`) followed by `tokens` (B, T) -> (B, L + T, D) input embeddings."""
        table = self.language_model.get_input_embeddings()
        count = features.shape[0]
        ids = self.prompt_ids.unsqueeze(0).expand(count, -1)
        if tokens is not None:
            ids = torch.cat([ids, tokens], dim=1)
        embeds = table(ids)
        positions = torch.tensor(self.image_positions, device=embeds.device)
        return embeds.index_copy(1, positions, features.to(embeds.dtype))

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy's log-probabilities: banned ids removed, at the sampling temperature."""
        logits = logits.float().masked_fill(self.banned.to(logits.device), float("-inf"))
        return F.log_softmax(logits / self.temperature, dim=-1)

    # ------------------------------------------------------------------ captions
    @torch.no_grad()
    def sample(
        self,
        features: torch.Tensor,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        max_new_tokens: int | None = None,
    ) -> CaptionBatch:
        """Captions of (B, N, D) image features: sampled at `temperature` (one host uniform per row and token from
        `generator`), or greedy."""
        steps = max_new_tokens or self.max_new_tokens
        count, device = features.shape[0], features.device
        out = self.language_model(inputs_embeds=self._embeds(features), use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        tokens = torch.full((count, steps), self.pad_id, dtype=torch.long, device=device)
        log_probs = torch.zeros(count, steps, device=device)
        mask = torch.zeros(count, steps, dtype=torch.bool, device=device)
        done = torch.zeros(count, dtype=torch.bool, device=device)
        finished = torch.zeros(count, dtype=torch.bool, device=device)
        table = self.language_model.get_input_embeddings()
        for step in range(steps):
            logp = self._log_softmax(logits)
            if greedy:
                token = logp.argmax(dim=-1)
            else:
                uniform = torch.rand(count, 1, generator=generator).to(device)
                cdf = logp.exp().cumsum(dim=-1)
                token = torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(1).clamp(max=logp.shape[-1] - 1)
            live = ~done
            tokens[:, step] = torch.where(live, token, self.pad_id)
            log_probs[:, step] = torch.where(live, logp.gather(1, token[:, None]).squeeze(1), 0.0)
            mask[:, step] = live
            stopped = live & (token == self.stop_id)
            finished |= stopped
            done |= stopped
            if step == steps - 1 or self._all_done(done):
                break
            out = self.language_model(inputs_embeds=table(token[:, None]), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
        used = int(mask.sum(dim=1).max())
        return CaptionBatch(tokens[:, :used], mask[:, :used], finished, log_probs[:, :used])

    def _all_done(self, done: torch.Tensor) -> bool:
        """Whether every caption is done: this rank's, or with `synced` every rank's (one all-reduce)."""
        if not self.synced:
            return bool(done.all())
        live = (~done).any().float()
        torch.distributed.all_reduce(live)
        return not bool(live)

    def token_log_probs(self, features: torch.Tensor, captions: CaptionBatch) -> torch.Tensor:
        """(B, T) log-probability of each caption token under the current weights (differentiable; 0 on padding)."""
        tokens = captions.tokens
        embeds = self._embeds(features, tokens[:, :-1])
        self.language_model.train(self.gradient_checkpointing and torch.is_grad_enabled())
        try:
            logits = self.language_model(inputs_embeds=embeds, use_cache=False).logits
        finally:
            self.language_model.eval()
        start = self.prompt_ids.numel() - 1
        logp = self._log_softmax(logits[:, start : start + tokens.shape[1]])
        chosen = logp.gather(2, tokens.unsqueeze(2)).squeeze(2)
        return torch.where(captions.mask, chosen, torch.zeros_like(chosen))

    def decode(self, captions: CaptionBatch) -> list[str]:
        """Captions as text (the stop token and other special tokens left out)."""
        rows = []
        for tokens, mask in zip(captions.tokens.tolist(), captions.mask.tolist(), strict=True):
            ids = [t for t, m in zip(tokens, mask, strict=True) if m and t != self.stop_id]
            rows.append(self.text_tokenizer.decode(ids, skip_special_tokens=True).strip())
        return rows

    @torch.no_grad()
    def caption(self, images: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = True) -> list[str]:
        """(B, 3, H, W) in [0, 1] -> B captions."""
        return self.decode(self.sample(self.image_features(images), generator, greedy=greedy))


def build_captioner(
    preset: MLLMPreset,
    tokenizer: UniLIPTokenizer,
    text_tokenizer=None,
    caption_format: CaptionFormat | None = None,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
) -> Captioner:
    """The captioner of an MLLM preset over `tokenizer` (its text tokenizer from the preset unless given)."""
    tokenizer.requires_grad_(False).eval()
    return Captioner(
        build_causal_language_model(preset),
        text_tokenizer if text_tokenizer is not None else load_text_tokenizer(preset.text_tokenizer),
        tokenizer,
        preset.image_token_id,
        caption_format,
        preset.source_size,
        max_new_tokens,
        temperature,
    )


# ---------------------------------------------------------------------------------------------- saved adapters
def save_captioner(
    captioner: Captioner,
    directory: str | Path,
    lora: LoRASpec | None,
    meta: dict[str, Any],
    adapters: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the captioner's LoRA adapters as a peft folder (`adapter_config.json`, `adapter_model.safetensors`;
    none without `lora`), its text tokenizer and `captioner.json` (the LoRA spec, caption format and `meta`: the
    MLLM preset, the tokenizer it reads through). The adapters are named for transformers' InternVL
    (`INTERNVL_NAMES`) and the config names the preset's InternVL weights as the base: `PeftModel.from_pretrained(
    InternVLForConditionalGeneration.from_pretrained(<those weights with the tokenizer exported into them>), folder)`
    is this captioner. `adapters`: the adapter tensors by name in the LLM, where they are not the LLM's own (e.g.
    gathered shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        base = (meta.get("mllm") or {}).get("weights")
        save_peft_adapter(captioner.language_model, directory, base, INTERNVL_NAMES, adapters)
    record = {
        "format": FORMAT,
        "lora": dataclasses.asdict(lora) | {"targets": list(lora.targets)} if lora is not None else None,
        "caption_format": dataclasses.asdict(captioner.format),
        "max_new_tokens": captioner.max_new_tokens,
        "temperature": captioner.temperature,
        **meta,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2))
    captioner.text_tokenizer.save_pretrained(str(directory / TEXT_TOKENIZER_DIR))
    return directory


def adapters_file(directory: str | Path) -> Path:
    """The file holding a saved captioner's adapters: peft's, or an older folder's own (absent without LoRA)."""
    directory = Path(directory)
    return directory / (PEFT_WEIGHTS_NAME if (directory / PEFT_CONFIG_NAME).is_file() else LEGACY_WEIGHTS_NAME)


def read_adapters(directory: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors a saved captioner holds, by their file's names (peft's, or the older folders' own)."""
    return load_safetensors(adapters_file(directory), what="captioner adapters")


def locate_captioner(path: str | Path) -> Path:
    """A saved captioner, or a unified run directory holding one (`<run>/captioner`)."""
    path = Path(path)
    if (path / "captioner" / CONFIG_NAME).is_file():
        return path / "captioner"
    if (path / CONFIG_NAME).is_file():
        return path
    raise WeightsNotFoundError(
        f"'{path}' is neither a saved captioner nor a finished unified run (no {CONFIG_NAME} and no captioner/ there)"
    )


def read_captioner_record(directory: str | Path) -> dict[str, Any]:
    config_file = Path(directory) / CONFIG_NAME
    if not config_file.is_file():
        raise WeightsNotFoundError(f"'{directory}' has no {CONFIG_NAME}; it is not a saved captioner")
    record = read_json(config_file, what="captioner record")
    if record.get("format") != FORMAT:
        raise WeightsNotFoundError(f"'{config_file}' is not a captioner record (format={record.get('format')!r})")
    return record


def load_captioner(
    directory: str | Path,
    tokenizer: UniLIPTokenizer,
    mllm_weights: str | None = None,
    caption_format: CaptionFormat | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
) -> tuple[Captioner, LoRASpec | None, dict[str, Any]]:
    """A captioner written by `save_captioner` over `tokenizer`, its adapters loaded strictly (frozen); the base
    LLM from the recorded MLLM preset (`mllm_weights` replaces its weights, e.g. where they live elsewhere).
    The question, length and temperature are the recorded ones unless given."""
    directory = Path(directory)
    record = read_captioner_record(directory)
    preset = MLLMPreset(**record["mllm"])
    if mllm_weights is not None:
        preset.weights = mllm_weights
    text_dir = directory / TEXT_TOKENIZER_DIR
    captioner = build_captioner(
        preset,
        tokenizer,
        load_text_tokenizer(str(text_dir) if text_dir.is_dir() else preset.text_tokenizer),
        caption_format or CaptionFormat(**record["caption_format"]),
        max_new_tokens or record.get("max_new_tokens", 128),
        temperature or record.get("temperature", 1.0),
    )
    if record.get("lora") is None:  # the MLLM's own captioning
        return captioner, None, record
    lora = LoRASpec(**record["lora"])
    adapters = add_lora(captioner.language_model, lora)
    if (directory / PEFT_CONFIG_NAME).is_file():
        load_peft_adapter(captioner.language_model, directory, INTERNVL_NAMES)
    else:  # a folder saved before the adapters were a peft folder: the LLM's own names
        load_adapters(adapters, read_adapters(directory), str(directory))
    for param in adapters.values():
        param.requires_grad_(False)
    log.info("loaded the captioner adapters of %s", directory)
    return captioner, lora, record
