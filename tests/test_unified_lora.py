"""LoRA through peft (`unilip.models.lora`): training the adapters leaves every base weight bit-identical, the
adapted model starts as the base, switching adapters off gives the base back, and merging folds them in.

"Starts as the base" is bit for bit only against a base whose weights are frozen as peft freezes them. The
weight's `requires_grad` picks the kernel: for a 3-D input that is not contiguous (SANA's attention output
goes into `to_out.0` transposed), torch's matmul folds the batch into one matrix product when the weight
requires grad, and runs a batched product otherwise (`should_fold` in aten/src/ATen/native/LinearAlgebra.cpp).
The two sum in different orders, so a trainable base and the adapted model differ by float32 rounding on
some CPUs (3.6e-7 on the DiT's output here) and agree exactly on others. With the same kernels the adapted
layer adds exact zeros (B = 0) to the base layer's own result, which is bit for bit on every CPU.
"""

import copy

import pytest
import torch
from diffusers import SanaTransformer2DModel
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config

from unilip.models.lora import LoRASpec, adapters_disabled, add_lora, merged_state_dict
from unilip.models.presets import CONF_DIR


def tiny_llm():
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_dit():
    torch.manual_seed(0)
    return SanaTransformer2DModel(**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dit" / "tiny.yaml").transformer))


def llm_out(model, ids):
    return model(input_ids=ids).logits


def dit_out(model, x):
    condition = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1))
    return model(hidden_states=x, encoder_hidden_states=condition, timestep=torch.tensor([500.0, 200.0]),
                 return_dict=False)[0]  # fmt: skip


@pytest.mark.numerics
@pytest.mark.parametrize(
    "build, run, targets, make_input",
    [
        (tiny_llm, llm_out, ("q_proj", "v_proj", "down_proj"), lambda: torch.randint(0, 50, (2, 7))),
        (tiny_dit, dit_out, ("to_q", "to_k", "to_v", "to_out.0"), lambda: torch.randn(2, 32, 2, 2)),
    ],
    ids=["llm", "dit"],
)
def test_training_adapters_leaves_the_base_weights_bit_identical(build, run, targets, make_input):
    model, base = build(), build().requires_grad_(False)  # frozen like the adapted model's base: the same kernels
    inputs = make_input()
    with torch.no_grad():
        before = run(base, inputs)
    adapters = add_lora(model, LoRASpec(rank=4, alpha=8, targets=targets, seed=0))
    assert adapters and all(".lora_" in name for name in adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)  # only adapters train
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)  # B = 0: the adapted model starts as the base
    originals = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        run(model, inputs).square().mean().backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in originals.items())  # every base weight, bit for bit
    with torch.no_grad():
        adapted = run(model, inputs)
        assert not torch.allclose(adapted, before)  # the adapters did learn something
        with adapters_disabled(model):
            assert torch.equal(run(model, inputs), before)  # off: exactly the base model
        assert torch.equal(run(model, inputs), adapted)  # on again
    assert all(p.requires_grad for p in adapters.values())  # switching back on kept them trainable
    frozen = copy.deepcopy(model).requires_grad_(False)
    with adapters_disabled(frozen):
        pass
    assert not any(p.requires_grad for p in frozen.parameters())  # ... and frozen ones frozen

    merged = merged_state_dict(model)
    plain = build()
    assert set(merged) == set(plain.state_dict())  # the base model's own key names
    plain.load_state_dict(merged)
    with torch.no_grad():
        # folded in: the same function, up to rounding W + s B A once (a few ulps of outputs of size ~1: at
        # most 4.2e-7 under the other-CPU kernels of .ci/numerics); an adapter lost or doubled moves it by >= 0.3
        assert torch.allclose(run(plain, inputs), adapted, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in originals.items())  # merging changed nothing


def test_unknown_targets_are_an_error():
    with pytest.raises(ValueError, match=r"lora\.targets"):
        add_lora(tiny_llm(), LoRASpec(targets=("no_such_layer",)))
