"""The dual-condition generator (UniLIP Sec. 3.3) at toy size: what the paper's design claims, checked directly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.models.generator import UniLIPGenerator, build_dit, count_parameters
from unilip.models.mllm import SPECIAL_TOKENS, build_conditioner, build_language_model, byte_level_tokenizer


@pytest.fixture(scope="module")
def presets():
    cfg = compose_train(["experiment=generate/quickstart", "stage=2", "run_dir=/tmp/unused"])
    return instantiate(cfg.mllm), instantiate(cfg.dit), cfg.generator


@pytest.fixture
def parts(presets, tiny_tokenizer):
    mllm, dit, sizes = presets
    conditioner = build_conditioner(mllm, tiny_tokenizer)
    generator = UniLIPGenerator.from_language_model(conditioner.language_model, build_dit(dit), **sizes)
    return conditioner, generator.eval()


def test_byte_level_tokenizer_saves_and_loads_with_the_internvl_tokens(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nun café <img><IMG_CONTEXT><IMG_CONTEXT></img><|im_end|>"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [257, 258, 259, 260, 261]
    assert loaded.pad_token_id == 256 and ids.count(261) == 2
    assert len("un café ".encode()) == sum(1 for i in ids if i < 256) - len("user\n")  # one token per byte
    assert loaded.decode(ids) == text


def test_connector_is_a_copy_of_the_last_llm_layers(parts, presets):
    conditioner, generator = parts
    llm = conditioner.language_model
    count = presets[2].connector_layers
    assert len(generator.connector.layers) == count
    for copy_, original in zip(generator.connector.layers, llm.layers[-count:], strict=True):
        assert all(
            torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), original.state_dict().values(), strict=True)
        )
    assert torch.equal(generator.connector.norm.weight, llm.norm.weight)
    assert not any(p.requires_grad for p in llm.parameters())


def test_connector_is_bidirectional_and_padding_changes_nothing(parts):
    _, generator = parts
    torch.manual_seed(1)
    hidden = torch.randn(2, 10, generator.queries.shape[1])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False  # row 1: 6 tokens, then padding
    out = generator.connect(hidden, mask)

    later = hidden.clone()
    later[0, 8] += 1.0  # a later token of row 0
    changed = (generator.connect(later, mask)[0, 0] - out[0, 0]).abs().max()
    assert changed > 1e-4  # position 0 sees position 8
    # the same layers with the LLM's causal mask would not: what the 4D mask changes
    causal = generator.connector(inputs_embeds=hidden, attention_mask=mask.long()).last_hidden_state
    causal_later = generator.connector(inputs_embeds=later, attention_mask=mask.long()).last_hidden_state
    assert torch.equal(causal[0, 0], causal_later[0, 0])

    padded = hidden.clone()
    padded[1, 6:] = torch.randn(4, hidden.shape[-1]) * 100  # anything in the padding
    again = generator.connect(padded, mask)
    assert torch.allclose(again[1, :6], out[1, :6], atol=1e-6)
    alone = generator.connect(hidden[1:, :6], mask[1:, :6])  # row 1 without any padding at all
    assert torch.allclose(alone[0], out[1, :6], atol=1e-5)


def _source_features(conditioner, image):
    side = conditioner.source_size
    resized = F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return conditioner.tokenizer.features(resized)  # independent of the conditioner's own path


def test_editing_path_source_features_reach_the_condition(parts):
    conditioner, generator = parts
    torch.manual_seed(2)
    source = torch.rand(1, 3, 80, 80)
    batch = conditioner.prepare(["make it black and white", "a cat"], [True, False], [False, False], 8)
    assert batch.image_mask[0].sum() == conditioner.num_image_tokens and not batch.image_mask[1].any()
    features = conditioner.image_features(source)
    hidden = conditioner(batch, generator.queries, features)
    # the dual condition: at image positions, the encoder's features themselves
    assert torch.allclose(hidden[0][batch.image_mask[0]], _source_features(conditioner, source)[0], atol=1e-6)

    with torch.no_grad():
        condition = generator.condition(conditioner, batch, features)
        other = generator.condition(conditioner, batch, conditioner.image_features(torch.rand(1, 3, 80, 80)))
        valid = batch.attention_mask
        query_rows = batch.query_mask[0]
        assert (condition[0][query_rows] - other[0][query_rows]).abs().max() > 1e-4  # the queries read the image
        assert torch.equal(condition[1][valid[1]], other[1][valid[1]])  # the text-to-image row does not

        short = 1 if valid[1].sum() < valid[0].sum() else 0
        ids = batch.input_ids.clone()
        ids[short][~valid[short]] = 65  # change every padding token
        repadded = generator.condition(conditioner, batch._replace(input_ids=ids), features)
        assert (~valid[short]).any()
        assert torch.allclose(repadded[short][valid[short]], condition[short][valid[short]], atol=1e-6)


def test_queries_learn_through_the_frozen_llm(parts):
    conditioner, generator = parts
    batch = conditioner.prepare(["a cat"], [False], [False], generator.config.num_queries)
    condition = generator.condition(conditioner, batch, None)
    condition.square().mean().backward()
    assert generator.queries.grad is not None and generator.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in conditioner.parameters())


def test_null_prompts_drop_the_caption_and_keep_the_image(parts):
    conditioner, _ = parts
    batch = conditioner.prepare(["a cat", "a cat", "flip it", "flip it"], [0, 0, 1, 1], [0, 1, 0, 1], 4)
    text = [
        conditioner.text_tokenizer.decode(ids[mask])
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
    ]
    assert "Generate an image: a cat" in text[0] and "a cat" not in text[1] and "Generate an image." in text[1]
    assert "flip it" in text[2] and "flip it" not in text[3]
    assert batch.image_mask[3].sum() == batch.image_mask[2].sum() == conditioner.num_image_tokens


# The reference's prompts, spelled out (its training collator and `scripts/inference_{gen,edit}.py`): the user turn,
# the assistant turn opened and `<img>` (InternVL3 id 151665), then the queries; the edit source as
# <img> <IMG_CONTEXT> x 256 </img> after the instruction. The whole string is tokenized at once.
REFERENCE_T2I = "<|im_start|>user\nGenerate an image: {}<|im_end|>\n<|im_start|>assistant\n<img>"
REFERENCE_EDIT = "<|im_start|>user\nEdit the image: {}\n<img>{}</img><|im_end|>\n<|im_start|>assistant\n<img>"


def _rows(batch, tokenizer):
    """Each row's prompt ids (before the queries), and the count and place of the query positions."""
    out = []
    for ids, queries, valid in zip(batch.input_ids, batch.query_mask, batch.attention_mask, strict=True):
        first = int(queries.nonzero()[0])
        assert queries[first:].sum() == queries.sum() and valid[: first + int(queries.sum())].all()
        out.append((ids[:first].tolist(), int(queries.sum()), int(valid.sum())))
    return out


def test_prompt_layout_is_the_references_token_sequence(parts):
    conditioner, _ = parts
    tok = conditioner.text_tokenizer
    batch = conditioner.prepare(["a red car", "make it blue"], [False, True], [False, False], 8)
    (t2i, queries, length), (edit, _, _) = _rows(batch, tok)
    context = "<IMG_CONTEXT>" * conditioner.num_image_tokens
    assert t2i == tok(REFERENCE_T2I.format("a red car"), add_special_tokens=False)["input_ids"]
    assert edit == tok(REFERENCE_EDIT.format("make it blue", context), add_special_tokens=False)["input_ids"]
    assert t2i[-1] == tok.convert_tokens_to_ids("<img>") and queries == 8 and length == len(t2i) + 8
    null = conditioner.prepare(["a red car"], [False], [True], 8)
    assert _rows(null, tok)[0][0] == tok(REFERENCE_T2I.replace(": {}", "."), add_special_tokens=False)["input_ids"]


def test_prompts_are_tokenized_whole_so_merges_across_their_edges_match(parts):
    """With BPE merges, tokenizing the template's pieces apart gives other tokens than the reference's
    one-piece tokenization ("image: a" -> ":", " ", "a" instead of ":", " a")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from unilip.models.mllm import PAD_TOKEN, DualConditioner

    conditioner, _ = parts
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"\u0120a": len(alphabet)}  # "Ġa": a space and an "a"
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "a")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    merged = DualConditioner(
        conditioner.language_model,
        tok,
        conditioner.tokenizer,
        tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        conditioner.prompts,
        conditioner.source_size,
    )
    ids = _rows(merged.prepare(["a red car"], [False], [False], 4), tok)[0][0]
    assert ids == tok(REFERENCE_T2I.format("a red car"), add_special_tokens=False)["input_ids"]
    assert vocab["\u0120a"] in ids  # the merge happened across the edge between "image:" and the prompt


@pytest.mark.parametrize(
    ("mllm", "dit", "expected_dit"), [("internvl3_1b", "sana_600m", 591.7e6), ("internvl3_2b", "sana_1600m", 1604.5e6)]
)
def test_real_presets_on_meta(mllm, dit, expected_dit):
    cfg = compose_train([f"experiment=generate/unilip_{'1b' if '1b' in mllm else '3b'}", "stage=2", "run_dir=/tmp/x"])
    assert (cfg.mllm.weights, cfg.dit.weights) == (
        f"OpenGVLab/InternVL3-{mllm[-2:].upper()}-hf",
        f"Efficient-Large-Model/Sana_{dit[5:].upper()}_512px_diffusers",
    )
    llm = build_language_model(instantiate(cfg.mllm), device="meta")
    with torch.device("meta"):
        generator = UniLIPGenerator.from_language_model(llm, build_dit(instantiate(cfg.dit), device="meta"), 256, 6)
    counts = {part: count_parameters(params) for part, params in generator.parts().items()}
    print(
        f"{mllm} + {dit}: LLM {count_parameters(llm) / 1e6:.1f}M (frozen); "
        + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
    )
    assert abs(counts["dit"] - expected_dit) < 0.001 * expected_dit
    assert len(generator.connector.layers) == 6
    assert counts["connector"] == 6 * count_parameters(llm.layers[0]) + count_parameters(llm.norm)
    assert counts["queries"] == 256 * llm.config.hidden_size
    assert generator.projection.out_features == 2304 == generator.dit.config.caption_channels


@pytest.mark.numerics
def test_gradient_checkpointing_gives_the_same_gradients(parts):
    conditioner, generator = parts
    generator.train()
    batch = conditioner.prepare(["a cat", "flip it"], [False, True], [False, False], generator.config.num_queries)
    features = conditioner.image_features(torch.rand(1, 3, 56, 56))
    latents, t = torch.randn(2, 32, 2, 2), torch.tensor([300.0, 700.0])

    def grads(model, cond):
        model.zero_grad()
        velocity = model(latents, t, model.condition(cond, batch, features), batch.attention_mask)
        velocity.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(generator, conditioner)
    checkpointed_generator, checkpointed_conditioner = copy.deepcopy(generator), copy.deepcopy(conditioner)
    checkpointed_generator.enable_gradient_checkpointing()
    checkpointed_conditioner.enable_gradient_checkpointing()
    checkpointed_conditioner.train()
    assert checkpointed_conditioner.language_model.training and not checkpointed_conditioner.tokenizer.training
    for a, b in zip(plain, grads(checkpointed_generator, checkpointed_conditioner), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_sana_checkpoint_with_a_null_scale_keeps_the_position_table_it_was_trained_with(tmp_path, presets):
    """diffusers 0.32 (the reference's) built SANA's sin-cos table for `interpolation_scale: null`; later
    versions build none. The preset's scale fills the null, and the table (never in a checkpoint) is
    rebuilt after the meta-device load exactly as diffusers builds it."""
    from diffusers import SanaTransformer2DModel

    from unilip.models.generator import DiTPreset

    _, dit, _ = presets
    assert dit.transformer["interpolation_scale"] == 1
    without_table = {**dit.transformer, "interpolation_scale": None}
    SanaTransformer2DModel(**without_table).save_pretrained(tmp_path / "transformer")
    assert '"interpolation_scale": null' in (tmp_path / "transformer" / "config.json").read_text()
    loaded = build_dit(DiTPreset(transformer=dit.transformer, weights=str(tmp_path)))
    expected = SanaTransformer2DModel(**dit.transformer).patch_embed.pos_embed  # diffusers' own table
    assert loaded.patch_embed.pos_embed is not None and not loaded.patch_embed.pos_embed.is_meta
    assert torch.equal(loaded.patch_embed.pos_embed, expected)
