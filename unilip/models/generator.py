"""The trained half of UniLIP generation: learnable queries, the connector and the SANA DiT (UniLIP Sec. 3.3).

    hidden (B, L, D)  the dual condition from `unilip.models.mllm.DualConditioner` (which reads `queries`)
    -> connector      a copy of the LLM's last K decoder layers (+ its final norm), bidirectional, padding masked
    -> projection     Linear(D, caption_channels)
    =  condition (B, L, C) + mask (B, L)
    -> SANA DiT       velocity (B, 32, h, w) of the rectified flow x_t = (1 - t) x0 + t n (target n - x0)

Sizes are presets (`conf/mllm/`, `conf/dit/`): the 1B model pairs InternVL3-1B with SANA-0.6B, the 3B
model InternVL3-2B with SANA-1.6B; in/out channels are 32 (UniLIP or DC-AE latents).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig

from unilip.models.hub import (
    WeightsNotFoundError,
    enable_activation_checkpointing,
    load_safetensors,
    load_strict,
    read_json,
    read_tensors,
    resolve_pretrained,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "unilip-generator"
PARTS = ("queries", "connector", "projection", "dit")


@dataclass
class DiTPreset:
    """A SANA DiT and the DC-AE its pretraining used; presets live in `conf/dit/`.

    Attributes:
        transformer: keyword arguments of diffusers' `SanaTransformer2DModel`.
        weights: hub id or directory of a SANA diffusers pipeline (its `transformer/`) or of the
            transformer itself; None: random weights drawn with `seed` (tiny preset).
        dcae: keyword arguments of diffusers' `AutoencoderDC` for a random one (tiny preset); None:
            read with `dcae_weights`.
        dcae_weights: where the DC-AE of stage 1 comes from (a pipeline's `vae/`, or the autoencoder;
            the reference encodes stage-1 targets with dc-ae-f32c32-sana-1.1).
        flow_shift: timestep shift of the sampler; None: the one in the SANA pipeline's
            `scheduler/scheduler_config.json` (the reference samples with that scheduler).
    """

    transformer: dict[str, Any]
    weights: str | None = None
    dcae: dict[str, Any] | None = None
    dcae_weights: str | None = None
    flow_shift: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.transformer = dict(self.transformer)
        self.dcae = dict(self.dcae) if self.dcae is not None else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sampler_flow_shift(self) -> float:
        """`flow_shift`, or the shift of the scheduler shipped with `weights` (`flow_shift`, or `shift` of
        a FlowMatchEuler config)."""
        if self.flow_shift is not None:
            return float(self.flow_shift)
        if self.weights is None:
            raise ValueError(
                "the dit preset has neither flow_shift nor weights with a scheduler config; set dit.flow_shift"
            )
        patterns = ("scheduler/*.json",)
        path = resolve_pretrained(
            self.weights, what="SANA scheduler config", option="dit.weights", allow_patterns=patterns
        )
        config_file = path / "scheduler" / "scheduler_config.json"
        if not config_file.exists():
            raise ValueError(
                f"'{path}' has no scheduler/scheduler_config.json; set dit.flow_shift=<its timestep shift>"
            )
        config = json.loads(config_file.read_text())
        shift = config.get("flow_shift", config.get("shift"))
        if shift is None:
            raise ValueError(f"'{config_file}' names no flow_shift (or shift); set dit.flow_shift")
        return float(shift)


def diffusers_files(subfolder: str) -> tuple[str, ...]:
    """What to download of one diffusers model: its `subfolder/` in a pipeline repo, or a model repo's own files.

    huggingface_hub matches these with `fnmatch`, whose `*` crosses `/`: `*.safetensors` would fetch every
    component of a SANA pipeline (its transformer and text encoder, gigabytes) for the DC-AE alone.
    """
    return (f"{subfolder}/*.json", f"{subfolder}/*.safetensors", "config.json", "diffusion_pytorch_model*")


def load_diffusers_model(
    cls: type, source: str, subfolder: str, option: str, expected: dict | None = None
) -> nn.Module:
    """A diffusers model from `source` (hub id or directory; `subfolder` of a pipeline if present), loaded strictly.

    `expected` (preset keyword arguments) must agree with the checkpoint's config on every key it names.
    """
    patterns = diffusers_files(subfolder)
    path = resolve_pretrained(source, what=f"{cls.__name__} weights", option=option, allow_patterns=patterns)
    if (path / subfolder).is_dir():
        path = path / subfolder
    config = cls.load_config(str(path))
    if expected:
        # a null in the checkpoint's config takes the preset's value: SANA's `interpolation_scale: null`
        # meant a sin-cos position table of scale 1 in the diffusers the reference trained with (0.32),
        # and none in later ones; the presets say what the released weights were trained with
        config |= {k: v for k, v in expected.items() if config.get(k, "absent") is None and v is not None}
        differs = [
            f"{k}: {config[k]} != {v}" for k, v in expected.items() if k in config and _plain(config[k]) != _plain(v)
        ]
        if differs:
            raise ValueError(f"'{path}' does not fit the preset ({'; '.join(differs)}); pick the matching preset")
    with torch.device("meta"):
        model = cls.from_config(config)
    _, tensors = read_tensors(path, ("",))
    load_strict(model, tensors, what=f"'{path}'")
    restore_position_table(model)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise RuntimeError(f"'{path}': buffers {left} were not in the checkpoint and cannot be rebuilt")
    log.info("loaded %s from %s", cls.__name__, path)
    return model


def restore_position_table(model: nn.Module) -> None:
    """Rebuild a DiT's sin-cos position table after a build on `meta` (a non-persistent buffer: never in
    checkpoints), as diffusers' PatchEmbed computes it."""
    embed = getattr(model, "patch_embed", None)
    table = getattr(embed, "pos_embed", None)
    if table is None or not table.is_meta:
        return
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = int(table.shape[1] ** 0.5)
    values = get_2d_sincos_pos_embed(
        table.shape[-1], grid, base_size=embed.base_size, interpolation_scale=embed.interpolation_scale
    )
    embed.register_buffer("pos_embed", values.float().unsqueeze(0), persistent=False)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_dit(preset: DiTPreset, device: str | torch.device | None = None) -> SanaTransformer2DModel:
    """The SANA DiT of `preset`: pretrained if it names weights, else random with `preset.seed`."""
    if str(device) == "meta":
        with torch.device("meta"):
            return SanaTransformer2DModel(**preset.transformer)
    if preset.weights is None:
        return _seeded(lambda: SanaTransformer2DModel(**preset.transformer), preset.seed)
    return load_diffusers_model(
        SanaTransformer2DModel, preset.weights, "transformer", "dit.weights", preset.transformer
    )


@dataclass
class GeneratorConfig:
    """Everything needed to rebuild a `UniLIPGenerator` without the LLM it was copied from.

    Attributes:
        text: the LLM's text config (`PreTrainedConfig.to_dict()`): the connector has its layer shapes.
        dit: keyword arguments of `SanaTransformer2DModel`.
        num_queries: learnable queries appended after the prompt (256, UniLIP recipe).
        connector_layers: LLM decoder layers the connector copies (the last 6, UniLIP recipe).
    """

    text: dict[str, Any]
    dit: dict[str, Any]
    num_queries: int = 256
    connector_layers: int = 6

    def connector_config(self) -> PreTrainedConfig:
        text = {k: v for k, v in self.text.items() if k not in ("layer_types", "max_window_layers")}
        text |= {"num_hidden_layers": self.connector_layers, "vocab_size": 1, "pad_token_id": None}
        config = AutoConfig.for_model(**text)
        config._attn_implementation, config.use_cache = "sdpa", False
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dit_velocity(
    dit: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A SANA transformer's velocity (`UniLIPGenerator.forward`; also for a frozen copy of its DiT)."""
    return dit(
        hidden_states=latents,
        encoder_hidden_states=condition.to(latents.dtype),
        timestep=timestep,
        encoder_attention_mask=mask.to(latents.dtype),
        return_dict=False,
    )[0]


class UniLIPGenerator(nn.Module):
    """Queries + connector + projection + SANA DiT: the parameters generation training updates.

    `parts()` names them as the stages treat them: stage 1 trains queries, connector and
    projection with the DiT frozen; stages 2 and 3 train all four.
    """

    def __init__(self, config: GeneratorConfig, dit: SanaTransformer2DModel | None = None):
        super().__init__()
        self.config = config
        connector_config = config.connector_config()
        width = connector_config.hidden_size
        self.queries = nn.Parameter(torch.randn(config.num_queries, width))  # N(0, 1), as the reference
        self.connector = AutoModel.from_config(connector_config)
        del self.connector.embed_tokens  # it reads hidden states, never token ids
        self.connector.main_input_name = "inputs_embeds"  # so checkpointing does not look for token embeddings
        self.dit = dit if dit is not None else SanaTransformer2DModel(**config.dit)
        self.projection = nn.Linear(width, self.dit.config.caption_channels)

    @classmethod
    def from_language_model(
        cls, language_model: nn.Module, dit: SanaTransformer2DModel, num_queries: int = 256, connector_layers: int = 6
    ) -> UniLIPGenerator:
        """A fresh generator whose connector starts as a copy of the LLM's last `connector_layers` layers."""
        layers = language_model.config.num_hidden_layers
        if not 1 <= connector_layers <= layers:
            raise ValueError(f"connector_layers={connector_layers}: the LLM has {layers} layers")
        dit_kwargs = {k: v for k, v in dit.config.items() if not k.startswith("_")}
        config = GeneratorConfig(language_model.config.to_dict(), dit_kwargs, num_queries, connector_layers)
        generator = cls(config, dit=dit)
        if not any(p.is_meta for p in language_model.parameters()):
            for copy, source in zip(generator.connector.layers, language_model.layers[-connector_layers:], strict=True):
                copy.load_state_dict(source.state_dict())
            generator.connector.norm.load_state_dict(language_model.norm.state_dict())
        return generator

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {
            "queries": [self.queries],
            "connector": list(self.connector.parameters()),
            "projection": list(self.projection.parameters()),
            "dit": list(self.dit.parameters()),
        }

    def enable_gradient_checkpointing(self) -> None:
        enable_activation_checkpointing(self.connector)
        self.dit.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ condition and velocity
    def connect(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) hidden states, (B, L) bool mask -> (B, L, C) DiT condition.

        Every position attends to every unpadded one (bidirectional, UniLIP): the connector's
        layers were causal in the LLM; here a 4D mask replaces the causal one.
        """
        length = mask.shape[1]
        bidirectional = mask[:, None, None, :].expand(-1, 1, length, -1)
        hidden = hidden.to(self.projection.weight.dtype)  # the frozen LLM may run in another dtype
        out = self.connector(inputs_embeds=hidden, attention_mask=bidirectional, use_cache=False).last_hidden_state
        return self.projection(out)

    def condition(self, conditioner: nn.Module, batch, features: torch.Tensor | None) -> torch.Tensor:
        """Prompts (`PromptBatch`) and edit features through the frozen conditioner and the connector -> (B, L, C)."""
        return self.connect(conditioner(batch, self.queries, features), batch.attention_mask)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Velocity: (B, 32, h, w) noisy latents, (B,) timesteps t * 1000, (B, L, C) condition, (B, L) mask."""
        return dit_velocity(self.dit, latents, timestep, condition, mask)

    # ------------------------------------------------------------------ weights in and out
    def save_pretrained(self, directory: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write `config.json` (the config and `meta`: where the MLLM, tokenizer and latents come from) and weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(
            json.dumps({"format": FORMAT, "config": self.config.to_dict(), **(meta or {})}, indent=2)
        )
        state = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> tuple[UniLIPGenerator, dict]:
        """A generator written by `save_pretrained`, and its meta."""
        directory = Path(directory)
        meta = read_meta(directory)
        state = load_safetensors(directory / WEIGHTS_NAME, what="generator weights", device=str(device))
        model = from_state(meta["config"], state, str(directory))
        return model, meta


def read_meta(directory: Path) -> dict[str, Any]:
    config_file = Path(directory) / CONFIG_NAME
    if not config_file.exists():
        raise WeightsNotFoundError(f"'{directory}' has no {CONFIG_NAME}; it is not a saved generator")
    meta = read_json(config_file, what="generator config")
    if meta.get("format") != FORMAT:
        raise WeightsNotFoundError(f"'{config_file}' is not a UniLIP generator config (format={meta.get('format')!r})")
    return meta


def from_state(config: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> UniLIPGenerator:
    """Build on `meta` and load `state` strictly (no random init of anything the state lacks)."""
    with torch.device("meta"):
        model = UniLIPGenerator(GeneratorConfig(**config))
    load_strict(model, state, what=what)
    model.connector.rotary_emb = type(model.connector.rotary_emb)(config=model.config.connector_config())
    restore_position_table(model.dit)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise RuntimeError(f"{what}: buffers {left} are not in the weights")
    return model


def count_parameters(module: nn.Module | list[nn.Parameter]) -> int:
    params = module.parameters() if isinstance(module, nn.Module) else module
    return sum(p.numel() for p in params)
