"""Reconstruction similarity (`unilip.evaluation.similarity`): tiny CLIP, SigLIP, DINOv2 and DINOv3 checkpoints
written offline in transformers' own format, read the way a user's real ones are, give the features their own
model and image processor give (an independent path: PIL resizing, transformers' processor), and the score is
the cosine of those pooled features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from unilip.evaluation.similarity import EncoderSpec, ReconstructionSimilarity, build_encoder, overall

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _clip(directory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(TINY, vocab_size=64, max_position_embeddings=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(TINY, image_size=28, patch_size=7),
                                 projection_dim=16))  # fmt: skip
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(directory)
    return model, lambda pixels: model.get_image_features(pixel_values=pixels)


def _siglip(directory):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    text = dict(TINY, vocab_size=64, max_position_embeddings=16)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(TINY, image_size=32, patch_size=8)))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return model, lambda pixels: model.get_image_features(pixel_values=pixels)


def _dinov2(directory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=7))
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, **imagenet).save_pretrained(
        directory
    )
    return model, lambda pixels: model(pixel_values=pixels).pooler_output


def _dinov3(directory):
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    model = DINOv3ViTModel(DINOv3ViTConfig(**TINY, image_size=32, patch_size=8, num_register_tokens=1))
    DINOv3ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return model, lambda pixels: model(pixel_values=pixels).pooler_output


FAMILIES = {"clip": _clip, "siglip": _siglip, "dinov2": _dinov2, "dinov3": _dinov3}


def save_tiny_encoder(family: str, directory):
    """A tiny random checkpoint of `family` with its image processor; returns (directory, their features fn)."""
    from transformers import AutoImageProcessor

    torch.manual_seed(0)
    model, features = FAMILIES[family](directory)
    model.eval().save_pretrained(directory)
    processor = AutoImageProcessor.from_pretrained(directory)

    def theirs(images: list[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            out = features(processor(images=images, return_tensors="pt")["pixel_values"])
        return getattr(out, "pooler_output", out)

    return directory, theirs


def photos(size=(64, 48)):  # 32 x 64 / 48 = 42.7: transformers rounds the longer side down
    pictures = (skdata.astronaut(), skdata.coffee(), skdata.chelsea())
    return [Image.fromarray(p).convert("RGB").resize(size) for p in pictures]


def as_tensor(images):
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 for im in images])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_features_are_the_ones_transformers_own_processor_and_model_give(family, tmp_path):
    directory, theirs = save_tiny_encoder(family, tmp_path / family)
    encoder = build_encoder(EncoderSpec(name=family, weights=str(directory)))
    images = photos()
    ours = encoder(as_tensor(images))
    reference = theirs(images)
    assert ours.shape == reference.shape
    # the same checkpoint weights, the preparation done two ways (torch on the device vs PIL in the processor)
    # (different photos: cosine 0.91 to 0.99 under these random encoders; the same photo: > 0.99997)
    assert F.cosine_similarity(ours, reference, dim=-1).min() > 0.9999


def test_the_score_is_the_cosine_of_pooled_features_per_encoder(tmp_path):
    clip_dir, clip_theirs = save_tiny_encoder("clip", tmp_path / "clip")
    dino_dir, dino_theirs = save_tiny_encoder("dinov2", tmp_path / "dino")
    specs = [EncoderSpec("clip", str(clip_dir), weight=0.25), EncoderSpec("dinov2", str(dino_dir), weight=0.75)]
    similarity = ReconstructionSimilarity.from_specs(specs)
    sources, regenerated = photos(), photos()[::-1]
    scores = similarity(as_tensor(sources), as_tensor(regenerated))
    for name, theirs in (("clip", clip_theirs), ("dinov2", dino_theirs)):
        a, b = theirs(sources).numpy(), theirs(regenerated).numpy()
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert np.allclose(scores[name].numpy(), cosine, atol=5e-3), name
    assert torch.allclose(similarity.weighted(scores), 0.25 * scores["clip"] + 0.75 * scores["dinov2"])
    same = similarity(as_tensor(sources), as_tensor(sources))
    assert all(torch.allclose(v, torch.ones(3), atol=1e-5) for v in same.values())  # an image and itself: 1
    assert overall({"clip": 0.5, "dinov2": 0.7}) == pytest.approx(0.6)


def test_random_encoders_are_reproducible_and_mistakes_are_named(tmp_path):
    spec = EncoderSpec("d", model_type="dinov2", config=dict(TINY, image_size=28, patch_size=7), image_size=28, seed=3)
    images = as_tensor(photos())
    assert torch.equal(build_encoder(spec)(images), build_encoder(spec)(images))  # the same seed, the same encoder
    with pytest.raises(ValueError, match="not a supported encoder"):
        build_encoder(EncoderSpec("v", model_type="vit"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        build_encoder(EncoderSpec("e", weights=str(tmp_path / "empty")))
    directory, _ = save_tiny_encoder("dinov2", tmp_path / "noproc")
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config"):
        build_encoder(EncoderSpec("p", weights=str(directory)))
    with pytest.raises(ValueError, match="each with its own name"):
        ReconstructionSimilarity.from_specs([spec, spec])
