"""Importing a generation checkpoint written in the reference's key layout: strict and complete (tiny sizes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.models.generator import UniLIPGenerator, build_dit
from unilip.models.hub import StateDictMismatchError
from unilip.models.mllm import build_conditioner
from unilip.pipelines import UniLIPPipeline
from unilip.pretrained.released import import_released, load_released_generator


@pytest.fixture(scope="module")
def presets():
    cfg = compose_train(["experiment=generate/quickstart", "stage=3", "run_dir=/tmp/unused"])
    return instantiate(cfg.mllm), instantiate(cfg.dit)


@pytest.fixture(scope="module")
def trained(presets, tiny_config):
    """A tiny generator with every tensor distinct from a fresh build (as trained weights are)."""
    from unilip.models import UniLIPTokenizer

    mllm, dit = presets
    torch.manual_seed(0)
    tokenizer = UniLIPTokenizer(tiny_config).eval()
    conditioner = build_conditioner(mllm, tokenizer)
    generator = UniLIPGenerator.from_language_model(conditioner.language_model, build_dit(dit), 8, 2)
    with torch.no_grad():
        for param in generator.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return generator, conditioner


def _reference_layout(generator: UniLIPGenerator, conditioner, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the reference's UniLIP_InternVLForCausalLM, keys written out by hand from its
    source (unilip/model/unilip_internvl.py: latent_queries (1, Q, D), llm_connector, projector, dit under
    `model.`; the frozen LLM, vision tower, mlp1 and UniLIP decoder beside them), saved in bf16."""
    state = {"model.latent_queries": generator.queries.detach()[None]}
    for name, tensor in generator.connector.state_dict().items():
        state[f"model.llm_connector.{name}"] = tensor
    state["model.projector.weight"] = generator.projection.weight.detach()
    state["model.projector.bias"] = generator.projection.bias.detach()
    for name, tensor in generator.dit.state_dict().items():
        state[f"model.dit.{name}"] = tensor
    for name, tensor in conditioner.language_model.state_dict().items():  # frozen copies, never read
        state[f"model.language_model.{name}"] = tensor
    state["lm_head.weight"] = torch.zeros(4, 48)
    state["model.vision_tower.embeddings.class_embedding"] = torch.zeros(1, 1, 32)
    state["model.multi_modal_projector.1.weight"] = torch.zeros(48, 128)
    state["model.vae_decoder.down_mlp.1.weight"] = torch.zeros(32, 48)
    state |= extra or {}
    return {key: value.to(torch.bfloat16).contiguous() for key, value in state.items()}


def _write(directory, state: dict[str, torch.Tensor], n_query: int = 8, connect_layer: int = 2) -> None:
    """Two safetensors shards and their index, as transformers' save_pretrained writes a large model."""
    directory.mkdir(parents=True)
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in halves.items():
        save_file({k: state[k] for k in names}, str(directory / file))
    weight_map = {k: file for file, names in halves.items() for k in names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "unilip_internvl", "n_query": n_query, "connect_layer": connect_layer, "unilip_factor": 4.5}
    (directory / "config.json").write_text(json.dumps(config))


def test_a_checkpoint_in_the_reference_layout_imports_strictly_and_completely(tmp_path, presets, trained):
    mllm, dit = presets
    generator, conditioner = trained
    _write(tmp_path / "release", _reference_layout(generator, conditioner))
    loaded, config = load_released_generator(tmp_path / "release", mllm, dit)
    assert config["unilip_factor"] == 4.5 and loaded.config.num_queries == 8 and loaded.config.connector_layers == 2
    ours, theirs = generator.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:  # every generator tensor came from the checkpoint (bf16 there, exact in fp32 here)
        assert torch.equal(theirs[key], ours[key].to(torch.bfloat16).float()), key

    unknown = _reference_layout(generator, conditioner, {"model.gen_projector.weight": torch.zeros(2, 2)})
    _write(tmp_path / "unknown", unknown)
    with pytest.raises(StateDictMismatchError, match=r"no part of the released UniLIP model: model\.gen_projector"):
        load_released_generator(tmp_path / "unknown", mllm, dit)
    short = _reference_layout(generator, conditioner)
    del short["model.dit.proj_out.weight"]
    _write(tmp_path / "short", short)
    with pytest.raises(StateDictMismatchError, match=r"missing keys: dit\.proj_out\.weight"):
        load_released_generator(tmp_path / "short", mllm, dit)
    _write(tmp_path / "other_size", _reference_layout(generator, conditioner), n_query=16)
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):
        load_released_generator(tmp_path / "other_size", mllm, dit)


def test_the_imported_release_samples_like_the_generator_it_holds(tmp_path, presets, trained):
    mllm, dit = presets
    generator, conditioner = trained
    _write(tmp_path / "release", _reference_layout(generator, conditioner))
    tokenizer_dir = tmp_path / "tokenizer"
    conditioner.tokenizer.save_pretrained(tokenizer_dir)
    out = import_released(
        tmp_path / "release",
        tmp_path / "imported",
        mllm,
        dit,
        str(tokenizer_dir),
        conditioner.tokenizer.config.to_dict(),
    )
    pipe = UniLIPPipeline.from_pretrained(out)
    assert pipe.flow_shift == 3.0 and pipe.latents.scale == 4.5  # the tiny DiT's shift, the release's factor
    rounded = copy.deepcopy(generator)  # the original generator, at the release's bf16 precision
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    direct = UniLIPPipeline(rounded.eval(), pipe.conditioner, pipe.latents, flow_shift=3.0)
    options = {"size": 56, "num_inference_steps": 2, "seed": 3}
    assert torch.equal(pipe(["a red car"], **options), direct(["a red car"], **options))
