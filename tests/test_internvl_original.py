"""Export into InternVL's original remote-code format (`OpenGVLab/InternVL3-1B`, what VLMEvalKit loads).

The base is built here by hand, laid out as the hub's InternVL3-1B is (config.json with `vision_config` /
`llm_config` / `auto_map`, python files, a text tokenizer, bfloat16 safetensors under the original names);
its vision part is renamed from a transformers InternVL by the hand-written tables of tests/test_internvl.py,
not by unilip's converter. tests/test_internvl_remote_code.py runs the result through InternVL's own code.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.test_internvl import hand_original_names, tiny_internvl
from unilip.export import main as export_main

VOCAB = 320
REMOTE_CODE = (
    "configuration_intern_vit.py",
    "configuration_internvl_chat.py",
    "conversation.py",
    "modeling_intern_vit.py",
    "modeling_internvl_chat.py",
)


def original_vision_names(vision: dict, projector: dict) -> dict[str, torch.Tensor]:
    """transformers' InternVL vision tower + projector tensors under InternVL's original names (hand-written)."""
    return hand_original_names(vision, projector, vit_prefix="vision_model.")


def original_config(tokenizer, **changes) -> dict:
    """config.json as OpenGVLab/InternVL3-1B writes it (its fields and values), at the tokenizer's tiny sizes."""
    vision = tokenizer.config.vision
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": vision["image_size"],
        "hidden_size": tokenizer.config.llm_hidden_size,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 256,
            "eos_token_id": 258,
            "hidden_act": "silu",
            "hidden_size": tokenizer.config.llm_hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "max_position_embeddings": 2048,
            "max_window_layers": 2,
            "model_type": "qwen2",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": VOCAB,
        },
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": vision["hidden_act"],
            "hidden_size": vision["hidden_size"],
            "image_size": vision["image_size"],
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "intermediate_size": vision["intermediate_size"],
            "layer_norm_eps": vision["layer_norm_eps"],
            "model_type": "intern_vit_6b",
            "norm_type": vision["norm_type"],
            "num_attention_heads": vision["num_attention_heads"],
            "num_channels": 3,
            "num_hidden_layers": vision["num_hidden_layers"],
            "patch_size": vision["patch_size"],
            "qk_normalization": False,
            "qkv_bias": vision["attention_bias"],
            "torch_dtype": "bfloat16",
            "use_flash_attn": True,
        },
    }
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def original_state(tokenizer, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights for the whole original model: a transformers InternVL of the tokenizer's sizes (other
    weights than the tokenizer's), renamed by hand."""
    model = tiny_internvl(tokenizer)
    state = original_vision_names(model.model.vision_tower.state_dict(), model.model.multi_modal_projector.state_dict())
    for name, value in model.model.language_model.state_dict().items():
        state["language_model.model." + name] = value
    state["language_model.lm_head.weight"] = model.lm_head.weight
    return {key: value.detach().to(dtype).contiguous() for key, value in state.items()}


def write_original_base(tokenizer, directory, *, sharded=False, state=None, **changes):
    """A tiny original-format InternVL checkpoint: config, remote-code files, text tokenizer, safetensors."""
    from unilip.models.mllm import byte_level_tokenizer

    directory.mkdir(parents=True)
    byte_level_tokenizer().save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(original_config(tokenizer, **changes), indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))
    (directory / "preprocessor_config.json").write_text(json.dumps({"crop_size": 448, "do_center_crop": True}))
    for name in REMOTE_CODE:
        (directory / name).write_text(f"# {name}: InternVL's remote code (a stand-in)\n")
    (directory / "examples").mkdir()
    (directory / "examples" / "image1.jpg").write_bytes(b"\xff\xd8 not really a photo")
    state = original_state(tokenizer) if state is None else state
    if not sharded:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for i, (key, value) in enumerate(sorted(state.items())):  # vision and LLM tensors in both shards
        shards[sorted(shards)[i % 2]][key] = value
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def read_weights(directory) -> dict[str, dict[str, torch.Tensor]]:
    """file name -> its tensors."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out[file.name] = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return out


def files_of(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def saved_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def _export(tokenizer_dir, base, out, *extra):
    export_main(["--tokenizer", str(tokenizer_dir), "--base", str(base), "--out", str(out), *extra])


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_an_original_base_gets_the_tokenizers_vision_part_and_keeps_everything_else(
    tiny_tokenizer, saved_tokenizer, tmp_path, sharded, caplog
):
    base = write_original_base(tiny_tokenizer, tmp_path / "InternVL3-1B", sharded=sharded)
    out = tmp_path / "InternVL3-1B-UniLIP"
    with caplog.at_level("INFO"):
        _export(saved_tokenizer, base, out)
    assert "verified" in caplog.text and "language model is the base's bit for bit" in caplog.text

    ours, theirs = read_weights(out), read_weights(base)
    assert ours.keys() == theirs.keys()  # the same files, each with the same tensors
    expected = original_vision_names(
        tiny_tokenizer.vision_tower.state_dict(), tiny_tokenizer.multi_modal_projector.state_dict()
    )
    vision = {}
    for file, tensors in ours.items():
        assert tensors.keys() == theirs[file].keys()
        for key, tensor in tensors.items():
            assert (tensor.shape, tensor.dtype) == (theirs[file][key].shape, theirs[file][key].dtype), key
            if key.startswith(("vision_model.", "mlp1.")):
                vision[key] = tensor
            else:
                assert torch.equal(tensor, theirs[file][key]), key  # the language model, bit for bit
    assert vision.keys() == expected.keys()
    for key, tensor in vision.items():
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key  # in the base's dtype
    # qkv is q, k and v stacked row-wise, read straight from the tokenizer's layer
    layer = tiny_tokenizer.vision_tower.encoder.layer[1].attention
    q, k, v = (getattr(layer, f"{p}_proj").weight.detach().to(torch.bfloat16) for p in "qkv")
    qkv = vision["vision_model.encoder.layers.1.attn.qkv.weight"]
    assert torch.equal(qkv[:32], q) and torch.equal(qkv[32:64], k) and torch.equal(qkv[64:], v)

    written, original = files_of(out), files_of(base)
    assert written.keys() == original.keys()
    for name, data in original.items():
        if name.endswith(".safetensors"):
            continue
        if name == "model.safetensors.index.json":  # the same tensors in the same files, the same size
            assert json.loads(written[name]) == json.loads(data)
        else:
            assert written[name] == data, name  # python files, tokenizer, configs, examples: byte for byte


def test_another_dtype_casts_every_tensor_the_same_way(tiny_tokenizer, saved_tokenizer, tmp_path):
    base = write_original_base(tiny_tokenizer, tmp_path / "base", sharded=True)
    _export(saved_tokenizer, base, tmp_path / "out", "--dtype", "float32")
    ours, theirs = read_weights(tmp_path / "out"), read_weights(base)
    expected = original_vision_names(
        tiny_tokenizer.vision_tower.state_dict(), tiny_tokenizer.multi_modal_projector.state_dict()
    )
    for file, tensors in ours.items():
        for key, tensor in tensors.items():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, expected[key] if key in expected else theirs[file][key].float()), key
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for f in ours.values() for t in f.values())


@pytest.mark.parametrize(
    "change, named",
    [
        ({"vision_config.hidden_size": 64}, "hidden_size: 64 != 32"),
        ({"vision_config.num_hidden_layers": 3}, "num_hidden_layers: 3 != 2"),
        ({"vision_config.patch_size": 16}, "patch_size: 16 != 14"),
        ({"vision_config.image_size": 448}, "image_size: 448 != 224"),
        ({"vision_config.qk_normalization": True}, "qk_normalization: True != False"),
        ({"force_image_size": 448}, "force_image_size: 448 != 224"),
        ({"llm_config.hidden_size": 64}, "llm_config.hidden_size: 64 != 48"),
        ({"downsample_ratio": 0.25}, "downsample_ratio: 0.25 != 0.5"),
        ({"ps_version": "v1"}, "ps_version: 'v1' != 'v2'"),
        ({"select_layer": -4}, "select_layer: -4 != -1"),
    ],
)
def test_a_base_that_does_not_fit_is_refused_before_its_weights_are_read(
    tiny_tokenizer, saved_tokenizer, tmp_path, change, named
):
    base = write_original_base(tiny_tokenizer, tmp_path / "base", **change)
    (base / "model.safetensors").write_bytes(b"never read")  # the refusal comes from the config alone
    with pytest.raises(SystemExit, match=r"^error: --base .* \(original InternVL format\) does not fit") as error:
        _export(saved_tokenizer, base, tmp_path / "new" / "out")
    assert named in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "new").exists()


def test_thumbnails_and_tile_counts_do_not_matter(tiny_tokenizer, saved_tokenizer, tmp_path):
    """use_thumbnail / max_dynamic_patch change how many tiles an image becomes, not what a tile's features are."""
    changes = {"use_thumbnail": False, "max_dynamic_patch": 6, "dynamic_image_size": False, "template": "other"}
    base = write_original_base(tiny_tokenizer, tmp_path / "base", **changes)
    _export(saved_tokenizer, base, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_truncated_base_weight_file_is_one_error_line(tiny_tokenizer, saved_tokenizer, tmp_path):
    base = write_original_base(tiny_tokenizer, tmp_path / "base", sharded=True)
    shard = base / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SystemExit, match=r"^error: '.*model-00002-of-00002.safetensors' is not a readable safe"):
        _export(saved_tokenizer, base, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.incomplete-*"))


def test_a_base_without_safetensors_weights_is_refused(tiny_tokenizer, saved_tokenizer, tmp_path):
    base = write_original_base(tiny_tokenizer, tmp_path / "base")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    with pytest.raises(SystemExit, match=r"^error: --base .* has no safetensors weights \(only pytorch_model.bin\)"):
        _export(saved_tokenizer, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_tensor_of_the_vision_part_is_accounted_for(tiny_tokenizer, saved_tokenizer, tmp_path):
    state = original_state(tiny_tokenizer)
    state["vision_model.encoder.layers.0.attn.mystery"] = torch.zeros(2)
    state.pop("vision_model.encoder.layers.1.ls2")
    state.pop("mlp1.3.bias")
    base = write_original_base(tiny_tokenizer, tmp_path / "base", state=state)
    with pytest.raises(SystemExit) as error:
        _export(saved_tokenizer, base, tmp_path / "out")
    message = str(error.value)
    assert message.startswith("error: the base's vision part does not match the tokenizer: ") and "\n" not in message
    assert "base tensors the tokenizer has nothing for: vision_model.encoder.layers.0.attn.mystery" in message
    assert (
        "tokenizer tensors the base has no place for: multi_modal_projector.linear_2.bias, "
        "vision_tower.encoder.layer.1.lambda_2" in message
    )
    assert not (tmp_path / "out").exists()


def test_the_verification_catches_a_changed_language_model(tiny_tokenizer, saved_tokenizer, tmp_path, monkeypatch):
    import unilip.pretrained.internvl_original as original

    write = original.export_to_original

    def tampered(*args, **kwargs):
        out = write(*args, **kwargs)
        tensors = read_weights(out)["model.safetensors"]
        tensors["language_model.model.norm.weight"] = tensors["language_model.model.norm.weight"] + 1
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out

    monkeypatch.setattr(original, "export_to_original", tampered)
    base = write_original_base(tiny_tokenizer, tmp_path / "base")
    with pytest.raises(SystemExit, match=r"^error: exported checkpoint .* changed the base's tensors language_model"):
        _export(saved_tokenizer, base, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


def test_the_verification_catches_wrong_vision_weights(tiny_tokenizer, saved_tokenizer, tmp_path, monkeypatch):
    """Past the key and shape checks, the feature comparison: here k and v of one layer swapped."""
    import unilip.pretrained.internvl_original as original

    write = original.export_to_original

    def tampered(*args, **kwargs):
        out = write(*args, **kwargs)
        tensors = read_weights(out)["model.safetensors"]
        q, k, v = tensors["vision_model.encoder.layers.0.attn.qkv.weight"].chunk(3)
        tensors["vision_model.encoder.layers.0.attn.qkv.weight"] = torch.cat([q, v, k])
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out

    monkeypatch.setattr(original, "export_to_original", tampered)
    base = write_original_base(tiny_tokenizer, tmp_path / "base")
    with pytest.raises(SystemExit, match=r"^error: the exported model's image features differ .* by \S+ \(tolerance"):
        _export(saved_tokenizer, base, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
