"""The name mapping between the original InternVL layout and ours, on hand-made state dicts (test_internvl.py and
test_internvl_original.py run it on whole tiny checkpoints): which name each tensor gets, and the errors and
log lines that name what did not fit."""

import logging

import pytest
import torch

from unilip.models.hub import StateDictMismatchError
from unilip.pretrained.internvl import convert_unilip_state_dict
from unilip.pretrained.internvl_original import to_original_names


def test_a_released_state_dict_gets_our_names_and_splits_qkv_row_wise():
    qkv = torch.arange(12.0).view(6, 2)  # rows 0-1 q, 2-3 k, 4-5 v
    state = {
        "encoder.encoder.layers.0.attn.qkv.weight": qkv,
        "mlp1.0.weight": torch.ones(3),
        "mlp1.3.bias": torch.zeros(2),
        "down_blocks.1.conv.weight": torch.full((1,), 2.0),
        "decoder.out.bias": torch.full((1,), 3.0),
    }
    converted = convert_unilip_state_dict(state)
    assert sorted(converted) == [
        "decoder.out.bias",
        "multi_modal_projector.layer_norm.weight",
        "multi_modal_projector.linear_2.bias",
        "residual_blocks.1.conv.weight",
        "vision_tower.encoder.layer.0.attention.k_proj.weight",
        "vision_tower.encoder.layer.0.attention.q_proj.weight",
        "vision_tower.encoder.layer.0.attention.v_proj.weight",
    ]
    prefix = "vision_tower.encoder.layer.0.attention."
    assert torch.equal(converted[prefix + "k_proj.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(converted["residual_blocks.1.conv.weight"], torch.full((1,), 2.0))


def test_unknown_keys_are_listed_eight_at_most_and_training_heads_are_dropped_with_a_log_line(caplog):
    eight = {f"mystery.{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(StateDictMismatchError) as listed:
        convert_unilip_state_dict(eight)
    assert str(listed.value) == f"unrecognised keys in the UniLIP checkpoint: {', '.join(eight)}"
    nine = {**eight, "encoder.encoder.layers.0.attn.mystery": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError) as cut:
        convert_unilip_state_dict(nine)
    assert str(cut.value) == f"unrecognised keys in the UniLIP checkpoint: {', '.join(eight)}, ... (9 in all)"
    with caplog.at_level(logging.INFO, logger="unilip.pretrained.internvl"):
        converted = convert_unilip_state_dict({"regressor.0.weight": torch.zeros(1), "regressor.0.bias": torch.zeros(1),
                                               "decoder.x": torch.zeros(1)})  # fmt: skip
    assert list(converted) == ["decoder.x"]
    assert [r.getMessage() for r in caplog.records] == ["ignored 2 training-only tensors (regressor.)"]


def test_every_base_key_without_a_tokenizer_tensor_is_named():
    vision = {"encoder.layer.0.attention.q_proj.weight": torch.zeros(2, 2)}  # k and v missing
    projector = {"layer_norm.weight": torch.ones(2), "linear_1.weight": torch.ones(2, 2)}
    base = [
        "vision_model.encoder.layers.0.attn.qkv.weight",
        "vision_model.encoder.layers.0.attn.unknown",
        "mlp1.2.weight",
        "mlp1.0.weight",
    ]
    with pytest.raises(StateDictMismatchError) as refused:
        to_original_names(base, vision, projector)
    assert str(refused.value) == (
        "the base's vision part does not match the tokenizer: base tensors the tokenizer has nothing for: "
        "mlp1.2.weight, vision_model.encoder.layers.0.attn.qkv.weight, vision_model.encoder.layers.0.attn.unknown; "
        "tokenizer tensors the base has no place for: multi_modal_projector.linear_1.weight, "
        "vision_tower.encoder.layer.0.attention.q_proj.weight"
    )
    out = to_original_names(["mlp1.0.weight", "mlp1.1.weight"], {}, projector)
    assert list(out) == ["mlp1.0.weight", "mlp1.1.weight"] and out["mlp1.1.weight"] is projector["linear_1.weight"]
