"""Weights in and out: InternVL / DC-AE checkpoints, released UniLIP files, export into InternVL."""

import json

import pytest
import torch
from diffusers import AutoencoderDC
from transformers import InternVLConfig, InternVLForConditionalGeneration

from unilip.export import main as export_main
from unilip.models import UniLIPTokenizer
from unilip.models.hub import StateDictMismatchError
from unilip.pretrained import build_tokenizer, load_tokenizer

# The original InternVL names, written out independently of unilip's converter
# (transformers/models/internvl/convert_internvl_weights_to_hf.py, in reverse).
HF_TO_ORIGINAL_VIT = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embeddings": "embeddings.position_embedding",
}
HF_TO_ORIGINAL_LAYER = {
    "attention.projection_layer": "attn.proj",
    "lambda_1": "ls1",
    "lambda_2": "ls2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hand_original_names(vision: dict, projector: dict, vit_prefix: str) -> dict[str, torch.Tensor]:
    """transformers' InternViT tensors (`vision`) and projector tensors under InternVL's original names: the ViT's
    below `vit_prefix` (q, k, v stacked into qkv), the projector's as `mlp1.{0,1,3}`."""
    out = {}
    for name, value in vision.items():
        if name in HF_TO_ORIGINAL_VIT:
            out[vit_prefix + HF_TO_ORIGINAL_VIT[name]] = value
            continue
        layer, rest = name[len("encoder.layer.") :].split(".", 1)
        prefix = f"{vit_prefix}encoder.layers.{layer}."
        if rest.startswith("attention.q_proj"):
            kind = rest.rsplit(".", 1)[1]
            qkv = [vision[f"encoder.layer.{layer}.attention.{p}_proj.{kind}"] for p in "qkv"]
            out[prefix + f"attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
        elif not rest.startswith(("attention.k_proj", "attention.v_proj")):
            module, param = rest.rsplit(".", 1) if "." in rest else (rest, None)
            out[prefix + HF_TO_ORIGINAL_LAYER[module] + (f".{param}" if param else "")] = value
    for name, value in projector.items():
        module, param = name.split(".")
        out[f"mlp1.{ {'layer_norm': 0, 'linear_1': 1, 'linear_2': 3}[module] }.{param}"] = value
    return out


def to_released_layout(model: UniLIPTokenizer) -> dict[str, torch.Tensor]:
    """Write a tokenizer's weights the way the released `1b_unilip.pth` names them."""
    out = hand_original_names(
        model.vision_tower.state_dict(), model.multi_modal_projector.state_dict(), vit_prefix="encoder."
    )
    for key, value in model.state_dict().items():
        if key.startswith("residual_blocks."):
            out["down_blocks." + key[len("residual_blocks.") :]] = value
        elif not key.startswith(("vision_tower.", "multi_modal_projector.")):
            out[key] = value
    return out


def test_import_released_checkpoint_layout(tiny_tokenizer, tmp_path):
    state = to_released_layout(tiny_tokenizer)
    assert "encoder.encoder.layers.0.attn.qkv.weight" in state and "mlp1.1.weight" in state
    state["regressor.weight"] = torch.zeros(3)  # training-only head some released files carry
    torch.save(state, tmp_path / "1b_unilip.pth")
    loaded = load_tokenizer(tmp_path / "1b_unilip.pth", preset="tiny").eval()
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.features(images), tiny_tokenizer.features(images))
        assert torch.equal(loaded(images), tiny_tokenizer(images))


def test_import_lists_unknown_and_missing_keys(tiny_tokenizer, tmp_path):
    state = to_released_layout(tiny_tokenizer)
    state["encoder.encoder.layers.0.attn.mystery"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError, match=r"unrecognised keys.*attn.mystery"):
        load_tokenizer(tmp_path / "bad.pth", preset="tiny")
    state.pop("encoder.encoder.layers.0.attn.mystery")
    state.pop("down_mlp.1.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError, match=r"missing keys: down_mlp.1.weight"):
        load_tokenizer(tmp_path / "bad.pth", preset="tiny")
    with pytest.raises(ValueError, match="pass its preset"):
        load_tokenizer(tmp_path / "bad.pth")


def tiny_internvl(tokenizer: UniLIPTokenizer, **options) -> InternVLForConditionalGeneration:
    """A tiny InternVL whose ViT and projector have the tokenizer's sizes; `options` change its config."""
    config = InternVLConfig(
        vision_config=tokenizer.config.vision,
        text_config=dict(
            model_type="qwen2",
            hidden_size=tokenizer.config.llm_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=320,
        ),
        image_token_id=300,
        tie_word_embeddings=False,
        **options,
    )
    torch.manual_seed(1)
    return InternVLForConditionalGeneration(config).eval()


@pytest.fixture
def internvl_dir(tiny_tokenizer, tmp_path):
    """A tiny InternVL checkpoint in transformers format, with a processor file beside it."""
    model = tiny_internvl(tiny_tokenizer)
    model.save_pretrained(tmp_path / "internvl")
    (tmp_path / "internvl" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return tmp_path / "internvl", model


def test_load_vision_tower_from_a_full_internvl_checkpoint(tiny_config, internvl_dir):
    path, reference = internvl_dir
    model = build_tokenizer(tiny_config, internvl_weights=str(path)).eval()
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            model.vision_tower.state_dict().values(), reference.model.vision_tower.state_dict().values(), strict=True
        )
    )
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        theirs = reference.get_image_features(pixel_values=(images - model.image_mean) / model.image_std)
        assert torch.allclose(model.features(images), theirs.pooler_output, atol=1e-6)


def test_an_internvl_checkpoint_of_another_size_is_refused(tiny_config, internvl_dir):
    import dataclasses

    path, _ = internvl_dir
    other = dataclasses.replace(tiny_config, vision={**tiny_config.vision, "intermediate_size": 96})
    with pytest.raises(ValueError, match=r"intermediate_size: 64 != 96"):
        build_tokenizer(other, internvl_weights=str(path))


def test_load_dcae_decoder(tiny_config, tmp_path):
    dec = tiny_config.decoder
    dcae = AutoencoderDC(
        latent_channels=32,
        attention_head_dim=dec["attention_head_dim"],
        encoder_block_types=dec["block_type"],
        decoder_block_types=dec["block_type"],
        encoder_block_out_channels=dec["block_out_channels"],
        decoder_block_out_channels=dec["block_out_channels"],
        encoder_layers_per_block=dec["layers_per_block"],
        decoder_layers_per_block=dec["layers_per_block"],
        encoder_qkv_multiscales=dec["qkv_multiscales"],
        decoder_qkv_multiscales=dec["qkv_multiscales"],
        upsample_block_type=dec["upsample_block_type"],
        downsample_block_type="Conv",
        decoder_norm_types=dec["norm_type"],
        decoder_act_fns=dec["act_fn"],
    )
    dcae.save_pretrained(tmp_path / "dcae")
    model = build_tokenizer(tiny_config, decoder_weights=str(tmp_path / "dcae"))
    latent = torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        assert torch.equal(model.decoder(latent), dcae.decode(latent).sample)


def test_export_into_internvl(tiny_tokenizer, internvl_dir, tmp_path):
    base, _ = internvl_dir
    out = tmp_path / "exported"
    export_main(["--tokenizer", str(_saved(tiny_tokenizer, tmp_path)), "--base", str(base), "--out", str(out)])

    model, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "tokenizer_config.json").exists()  # processor/tokenizer files carried over
    model.eval()
    for size in (224, 448):
        images = torch.rand(2, 3, size, size)
        with torch.no_grad():
            ours = tiny_tokenizer.features(images)
            pixel_values = (images - tiny_tokenizer.image_mean) / tiny_tokenizer.image_std
            theirs = model.get_image_features(pixel_values=pixel_values).pooler_output
        assert (ours - theirs).abs().max() <= 1e-5
    # the language model is the base's, untouched
    base_model = InternVLForConditionalGeneration.from_pretrained(base)
    assert torch.equal(model.lm_head.weight, base_model.lm_head.weight)


def _saved(model, tmp_path):
    model.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_export_cli_reports_a_missing_tokenizer_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*no such file or directory"):
        export_main(["--tokenizer", str(tmp_path / "missing"), "--base", str(tmp_path), "--out", str(tmp_path / "o")])


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"projector_hidden_act": "relu"}, "projector_hidden_act='relu', the tokenizer's is 'gelu'"),
        ({"vision_feature_layer": -2}, "vision_feature_layer=-2, the tokenizer's is -1"),
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy='full'"),
    ],
)
def test_export_refuses_a_base_that_computes_other_features(tiny_tokenizer, tmp_path, options, named):
    """These bases loaded and exported as 'verified' (relu: max diff 5.7e-2); they are refused before loading."""
    tiny_internvl(tiny_tokenizer, **options).save_pretrained(tmp_path / "base")
    before = _tree(tmp_path)
    args = ["--tokenizer", str(_saved(tiny_tokenizer, tmp_path)), "--base", str(tmp_path / "base")]
    with pytest.raises(SystemExit, match=r"^error: --base .* computes image features differently") as error:
        export_main([*args, "--out", str(tmp_path / "out")])
    assert named in str(error.value)
    assert not (tmp_path / "out").exists() and _tree(tmp_path).keys() - before.keys() == {
        p.relative_to(tmp_path) for p in (tmp_path / "tokenizer").iterdir()
    }


def test_export_refuses_a_base_that_is_not_an_internvl_checkpoint(tiny_tokenizer, tmp_path):
    """The tokenizer's own folder as --base: once loaded with a default 4096-wide LLM until killed for memory."""
    saved = _saved(tiny_tokenizer, tmp_path)
    with pytest.raises(SystemExit, match=r"^error: --base .* is not a transformers InternVL checkpoint"):
        export_main(["--tokenizer", str(saved), "--base", str(saved), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_verification_exits_without_a_checkpoint(tiny_tokenizer, tmp_path, monkeypatch):
    """Past the config check (switched off here), the feature comparison itself refuses the relu base."""
    tiny_internvl(tiny_tokenizer, projector_hidden_act="relu").save_pretrained(tmp_path / "base")
    monkeypatch.setattr("unilip.pretrained.internvl.check_internvl_base", lambda *args: None)
    out = tmp_path / "new" / "out"
    args = ["--tokenizer", str(_saved(tiny_tokenizer, tmp_path)), "--base", str(tmp_path / "base")]
    with pytest.raises(SystemExit, match=r"^error: the exported model's image features differ .* by \S+ \(tolerance"):
        export_main([*args, "--out", str(out)])
    assert not (tmp_path / "new").exists()  # neither the output, nor the staging directory, nor its parent


def test_a_bfloat16_export_is_checked_as_tightly_as_float32(tiny_tokenizer, internvl_dir, tmp_path, caplog):
    from unilip.pretrained.internvl import export_to_internvl, verify_export

    base, _ = internvl_dir
    for dtype in (torch.float32, torch.bfloat16):
        out = export_to_internvl(tiny_tokenizer, base, tmp_path / str(dtype), dtype=dtype)
        check = verify_export(tiny_tokenizer, out)
        assert check.dtype == dtype and check.ok and check.difference <= 1e-5
        if dtype == torch.float32:
            assert check.rounding == 0
        else:  # rounding the weights to bfloat16 moves the features far more than the tolerance allows
            assert check.rounding > 10 * check.tolerance
    with caplog.at_level("INFO"):
        export_main(
            [
                "--tokenizer",
                str(_saved(tiny_tokenizer, tmp_path)),
                "--base",
                str(base),
                "--out",
                str(tmp_path / "cli"),
                "--dtype",
                "bfloat16",
            ]
        )
    assert "verified" in caplog.text and "saving in bfloat16 moves them by" in caplog.text
    assert not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]
