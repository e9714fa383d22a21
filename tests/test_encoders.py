"""Every encoder behind one interface: shapes, features equal to the home model's, parts, save/load, sizes.

Expected values are computed independently of `unilip.models.encoders`: the home model is built from
its own transformers class, normalised with the numbers of its image processor written out here, and
its tokens are dropped and merged by hand.
"""

import dataclasses

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from unilip.errors import ConfigError
from unilip.models import TokenizerConfig, UniLIPTokenizer
from unilip.models.presets import CONF_DIR, tokenizer_preset
from unilip.models.tokenizer import FrozenEncoder
from unilip.pretrained import load_tokenizer
from unilip.tasks.tokenizer.stages import apply_stage

KINDS = ("internvit", "siglip", "siglip2", "dinov2", "dinov2_with_registers", "dinov2 unmerged")
HALF = (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny(kind: str) -> TokenizerConfig:
    """The tiny preset of each encoder; the NaFlex SigLIP 2, plain DINOv2 and an unmerged DINOv2 derived from them."""
    if kind == "internvit":
        return tokenizer_preset("tiny")
    if kind == "siglip":
        return tokenizer_preset("tiny_siglip2")
    if kind == "siglip2":
        siglip = tokenizer_preset("tiny_siglip2")
        vision = {k: v for k, v in siglip.vision.items() if k != "image_size"} | {"num_patches": 64}
        return dataclasses.replace(siglip, encoder="siglip2", vision=vision)
    registers = tokenizer_preset("tiny_dinov2")
    if kind == "dinov2_with_registers":
        return registers
    vision = {k: v for k, v in registers.vision.items() if k != "num_register_tokens"}
    plain = dataclasses.replace(registers, encoder="dinov2", vision=vision)
    return plain if kind == "dinov2" else dataclasses.replace(plain, downsample_ratio=1.0)


# Pixels per latent position and feature width, from the presets' numbers: patch x merge, width x merge^2.
GEOMETRY = {
    "internvit": (28, 48),  # patch 14, pixel shuffle 0.5, projector to 48
    "siglip": (32, 128),  # patch 16, 2x2 merge, 4 x 32
    "siglip2": (32, 128),
    "dinov2": (28, 128),  # patch 14, 2x2 merge
    "dinov2_with_registers": (28, 128),
    "dinov2 unmerged": (14, 32),
}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def tokenizer(kind):
    torch.manual_seed(0)
    return UniLIPTokenizer(tiny(kind)).eval()


@pytest.mark.parametrize("size", [224, 448, 256])
def test_shapes(kind, tokenizer, size):
    multiple, width = GEOMETRY[kind]
    grid = -(-size // multiple)  # 256 is padded to the next multiple
    images = torch.rand(1, 3, size, size)
    with torch.no_grad():
        assert tokenizer.features(images).shape == (1, grid * grid, width)
        latent = tokenizer.encode(images)
        assert latent.shape == (1, 32, grid, grid)
        if size == 448:
            return  # decoding it is what 224 checks, at four times the cost
        out = tokenizer.reconstruct(images)
        assert torch.equal(out.latent, latent) and out.images.shape == (1, 3, size, size)  # 256: cropped back
        assert tokenizer.decode(latent).shape == (1, 3, grid * multiple, grid * multiple)


def _merge_2x2(tokens, height, width):
    """(B, h*w, C) -> (B, h/2*w/2, 4C): the four tokens of each 2x2 square, top-left, top-right, bottom-left, ..."""
    grid = tokens.reshape(tokens.shape[0], height, width, -1)
    squares = [grid[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]
    return torch.cat(squares, dim=-1).flatten(1, 2)


def home_features(kind: str, tokenizer: UniLIPTokenizer, images: torch.Tensor) -> torch.Tensor:
    """The features computed with the home model's own class, from the tokenizer's weights."""
    config = tokenizer.config
    vision = dict(config.vision)
    model_class, config_class = {
        "siglip": (SiglipVisionModel, SiglipVisionConfig),
        "siglip2": (Siglip2VisionModel, Siglip2VisionConfig),
        "dinov2": (Dinov2Model, Dinov2Config),
        "dinov2 unmerged": (Dinov2Model, Dinov2Config),
        "dinov2_with_registers": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig),
    }[kind]
    model = model_class(config_class(**vision)).eval()
    model.load_state_dict(tokenizer.vision_tower.state_dict())
    with torch.no_grad():
        hidden = model(**home_inputs(kind, config, images)).last_hidden_state
    return home_tokens_to_features(kind, config, hidden, images.shape[-2:])


def home_inputs(kind: str, config: TokenizerConfig, images: torch.Tensor) -> dict:
    """(B, 3, H, W) in [0, 1] -> the home model's keyword arguments, as its image processor prepares them."""
    mean, std = {"siglip": (HALF, HALF), "siglip2": (HALF, HALF)}.get(kind, IMAGENET)
    pixels = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    patch = config.vision["patch_size"]
    height, width = images.shape[-2] // patch, images.shape[-1] // patch
    if kind == "siglip2":  # NaFlex: the image processor's own patching
        patches = torch.stack([_patches(image, patch) for image in pixels])
        shapes = torch.tensor([[height, width]] * len(images))
        return {
            "pixel_values": patches,
            "pixel_attention_mask": torch.ones(patches.shape[:2], dtype=torch.int32),
            "spatial_shapes": shapes,
        }
    if kind == "siglip":
        return {"pixel_values": pixels, "interpolate_pos_encoding": True}
    return {"pixel_values": pixels}


def _patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (h * w, p * p * C) by Siglip2ImageProcessor's own function, which takes (C, H, W) tensors in
    recent transformers and (H, W, C) arrays in 5.0."""
    try:
        return convert_image_to_patches(image, patch)
    except RuntimeError:  # 5.0 reads the channels as the height: no whole patch fits
        return torch.from_numpy(convert_image_to_patches(image.permute(1, 2, 0).numpy(), patch))


def home_tokens_to_features(kind: str, config: TokenizerConfig, hidden: torch.Tensor, size) -> torch.Tensor:
    """The home model's last hidden state (B, T, C) -> the tokenizer's features: patch tokens (without CLS and
    registers), merged 2 x 2 unless the preset does not merge."""
    skip = {"dinov2": 1, "dinov2 unmerged": 1, "dinov2_with_registers": 5}.get(kind, 0)  # CLS, 4 registers
    patch = config.vision["patch_size"]
    height, width = size[0] // patch, size[1] // patch
    tokens = hidden[:, skip:]
    return tokens if config.downsample_ratio == 1.0 else _merge_2x2(tokens, height, width)


@pytest.mark.parametrize("patches", [4, 16])  # 16 x 16 patches: the tiny presets' native grid (no interpolation)
def test_features_are_the_home_models_output(kind, tokenizer, patches):
    if kind == "internvit":
        pytest.skip("InternViT's features are checked against InternVL itself in test_internvl.py")
    size = patches * tokenizer.config.vision["patch_size"]
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ours = tokenizer.features(images)
    theirs = home_features(kind, tokenizer, images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_non_square_input(kind, tokenizer):
    multiple, _ = GEOMETRY[kind]
    images = torch.rand(1, 3, 2 * multiple, 3 * multiple)
    with torch.no_grad():
        out = tokenizer.reconstruct(images)
    assert out.latent.shape == (1, 32, 2, 3) and out.images.shape == images.shape
    if kind != "internvit":
        torch.testing.assert_close(out.features, home_features(kind, tokenizer, images), rtol=0, atol=1e-6)


def test_normalisation_is_the_encoders_own(kind, tokenizer):
    expected = {"internvit": IMAGENET, "siglip": (HALF, HALF), "siglip2": (HALF, HALF)}.get(kind, IMAGENET)
    config = tiny(kind)
    assert (config.image_mean, config.image_std) == expected
    # `normalise` (the checks outside the tokenizer feed it) against transformers' own image normalisation
    from transformers.image_transforms import normalize

    images = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    theirs = [normalize(image.numpy(), *expected, input_data_format="channels_first") for image in images]
    torch.testing.assert_close(tokenizer.encoder.normalise(images), torch.as_tensor(np.stack(theirs)))


def test_a_siglip_without_its_pooling_head_has_no_unused_parameters():
    config = tiny("siglip")
    headless = UniLIPTokenizer(dataclasses.replace(config, vision={**config.vision, "vision_use_head": False}))
    assert not hasattr(headless.encoder.core, "head") and headless.encoder.unused_parameters() == []


def test_every_parameter_is_in_one_part_or_unused_and_frozen(kind, tokenizer):
    in_parts = [id(p) for part in tokenizer.parts() for p in tokenizer.part_parameters(part)]
    unused = tokenizer.encoder.unused_parameters()
    assert len(in_parts) == len(set(in_parts))
    assert set(in_parts) | {id(p) for p in unused} == {id(p) for p in tokenizer.parameters()}
    assert not {id(p) for p in unused} & set(in_parts)
    names = {id(p): n for n, p in tokenizer.named_parameters()}
    unused_names = sorted(names[id(p)] for p in unused)
    expected = {
        "internvit": [],
        "siglip": "head.",  # the attention-pooling head
        "siglip2": "head.",
        "dinov2": ["vision_tower.embeddings.mask_token"],
        "dinov2 unmerged": ["vision_tower.embeddings.mask_token"],
        "dinov2_with_registers": ["vision_tower.embeddings.mask_token"],
    }[kind]
    if isinstance(expected, str):
        assert unused_names and all(expected in name for name in unused_names)
    else:
        assert unused_names == expected
    assert not any(p.requires_grad for p in unused)


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_reach_exactly_the_trainable_parts(kind, tokenizer, stage):
    apply_stage(tokenizer, stage)
    out = tokenizer.reconstruct(torch.rand(2, 3, 64, 64))
    (out.images.square().mean() + out.features.square().mean()).backward()
    trainable = {1: {"bottleneck", "decoder"}, 2: {"encoder", "bottleneck", "decoder"}}[stage]
    for part in ("encoder", "bottleneck", "decoder"):
        for param in tokenizer.part_parameters(part):
            assert (param.grad is not None) == (part in trainable) == param.requires_grad, part
    assert all(p.grad is None and not p.requires_grad for p in tokenizer.encoder.unused_parameters())


def test_save_load_round_trip_and_teacher(kind, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok").eval()
    assert loaded.config == tokenizer.config and loaded.config.encoder == tokenizer.config.encoder
    ours, theirs = tokenizer.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any(p.requires_grad for p in loaded.encoder.unused_parameters())
    images = torch.rand(1, 3, 224, 224)  # the tiny presets' native grid: SigLIP reads its (unsaved) position ids
    teacher = FrozenEncoder(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(images), tokenizer(images))
        assert torch.equal(teacher.features(images), tokenizer.features(images))


def test_the_encoders_modules_keep_their_names(kind, tokenizer):
    """The encoder's modules are the tokenizer's own (one object, two views), named as in the encoder."""
    assert dict(tokenizer.encoder.named_children()) == {
        name: module for name, module in tokenizer.named_children() if name in dict(tokenizer.encoder.named_children())
    }
    expected = ["vision_tower", "multi_modal_projector"] if kind == "internvit" else ["vision_tower"]
    assert [name for name, _ in tokenizer.encoder.named_children()] == expected
    blocks = tokenizer.encoder.blocks()
    assert len(blocks) == 2 and all(any(b is m for m in tokenizer.vision_tower.modules()) for b in blocks)


def test_a_config_the_encoder_cannot_honour_is_refused():
    with pytest.raises(ConfigError, match=r"encoder='clip' is not a known encoder; use one of internvit, siglip"):
        dataclasses.replace(tiny("siglip"), encoder="clip")
    with pytest.raises(
        ConfigError,
        match=r"^llm_hidden_size=48: the siglip encoder has no InternVL projector; remove llm_hidden_size "
        r"from the preset$",
    ):
        dataclasses.replace(tiny("siglip"), llm_hidden_size=48)
    with pytest.raises(
        ConfigError, match=r"^the internvit encoder needs llm_hidden_size \(the InternVL projector's output width\)$"
    ):
        dataclasses.replace(tiny("internvit"), llm_hidden_size=None)
    with pytest.raises(ConfigError, match=r"downsample_ratio=0.3"):
        dataclasses.replace(tiny("dinov2"), downsample_ratio=0.3)


def _count(params):
    return sum(p.numel() for p in params)


def _meta(preset):
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base="1.3"):
        cfg = compose(config_name=preset)
    model = instantiate(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    return model


def _siglip_so400m(patch: int, positions: int) -> int:
    """SoViT-400m's parameters from its published shape (width 1152, depth 27, MLP 4304, 16 heads), by hand."""
    width, depth, mlp = 1152, 27, 4304
    attention = 4 * (width * width + width)
    block = attention + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width
    pooling = width + (3 * width * width + 3 * width) + (width * width + width)  # probe, multi-head attention
    head = pooling + 2 * width + (2 * width * mlp + mlp + width)  # + LayerNorm, MLP
    return depth * block + 3 * patch * patch * width + width + positions * width + 2 * width + head


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("siglip2_so400m_patch14_384", _siglip_so400m(14, 27 * 27)),  # conv patch embedding
        ("siglip2_so400m_patch16_384", _siglip_so400m(16, 24 * 24)),
        ("siglip2_so400m_patch16_naflex", _siglip_so400m(16, 16 * 16)),  # linear patch embedding: same count
    ],
)
def test_siglip2_presets_have_the_so400m_vision_tower(preset, expected):
    tower = _count(_meta(preset).vision_tower.parameters())
    print(f"{preset}: vision tower {tower / 1e6:.2f}M")
    assert tower == expected
    assert abs(tower - 428e6) / 428e6 < 0.01  # "So400m": 428M with its pooling head (SoViT-400m/14)


@pytest.mark.parametrize(("preset", "published"), [("dinov2_base", 86e6), ("dinov2_large", 304e6)])
def test_dinov2_presets_match_published_parameter_counts(preset, published):
    model = _meta(preset)
    tower = _count(model.vision_tower.parameters())
    print(f"{preset}: ViT {tower / 1e6:.2f}M, decoder {_count(model.decoder.parameters()) / 1e6:.2f}M")
    assert abs(tower - published) / published < 0.01  # DINOv2 ViT-B/14 86M, ViT-L/14 304M (with 4 registers)
    assert abs(_count(model.decoder.parameters()) - 159e6) / 159e6 < 0.01  # DC-AE f32c32 decoder
