"""The tokenizer model: shapes, padding, value ranges, trainable parts, presets, save/load."""

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unilip.models import UniLIPTokenizer
from unilip.models.hub import StateDictMismatchError, WeightsNotFoundError
from unilip.models.presets import CONF_DIR
from unilip.pretrained import build_tokenizer, load_tokenizer
from unilip.tasks.tokenizer.stages import apply_stage


@pytest.mark.parametrize(("size", "grid"), [(224, 8), (448, 16), (256, 10)])
def test_shapes(tiny_tokenizer, size, grid):
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = tiny_tokenizer.reconstruct(images)
        latent = tiny_tokenizer.encode(images)
        features = tiny_tokenizer.features(images)
    width = tiny_tokenizer.config.llm_hidden_size
    assert latent.shape == (2, 32, grid, grid)  # 256 is padded to 280 = 10 x 28
    assert torch.equal(out.latent, latent)
    assert features.shape == (2, grid * grid, width)
    assert out.images.shape == (2, 3, size, size)
    assert tiny_tokenizer.decode(latent).shape == (2, 3, 28 * grid, 28 * grid)
    assert tiny_tokenizer.decode(latent, size=(size, size)).shape == (2, 3, size, size)


def test_non_square_input(tiny_tokenizer):
    with torch.no_grad():
        out = tiny_tokenizer.reconstruct(torch.rand(1, 3, 224, 336))
    assert out.latent.shape == (1, 32, 8, 12)
    assert out.images.shape == (1, 3, 224, 336)


def test_padding_is_reflect_and_cropped_back(tiny_tokenizer):
    """A 256 image is reflect-padded to 280 (12 px each side) and the output cropped back."""
    images = torch.rand(1, 3, 256, 256)
    padded, padding = tiny_tokenizer._pad(images)
    assert padded.shape[-2:] == (280, 280) and padding == (12, 12, 12, 12)
    assert torch.equal(padded[..., 12:268, 12:268], images)
    assert torch.equal(padded[..., 11, 12:268], images[..., 1, :])  # reflection, not replication
    with torch.no_grad():
        full = tiny_tokenizer.decode(tiny_tokenizer.encode(images), size=(280, 280))
        assert torch.equal(tiny_tokenizer(images), full[..., 12:268, 12:268])


def test_decode_maps_decoder_range_to_unit_interval(tiny_tokenizer, monkeypatch):
    """The DC-AE decoder speaks [-1, 1]; decode() returns (y + 1) / 2, unclamped."""
    latent = torch.zeros(1, 32, 2, 2)
    for value, expected in ((-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (3.0, 2.0)):
        monkeypatch.setattr(tiny_tokenizer.decoder, "forward", lambda z, v=value: torch.full((1, 3, 64, 64), v))
        assert torch.allclose(tiny_tokenizer.decode(latent), torch.full((1, 3, 56, 56), expected), atol=1e-6)


def test_size_not_multiple_without_padding_is_an_error(tiny_config):
    model = UniLIPTokenizer(dataclasses.replace(tiny_config, pad_to_multiple=False))
    with pytest.raises(ValueError, match=r"256x256 is not a multiple of 28.*pad_to_multiple=true"):
        model(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(torch.rand(3, 224, 224))


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_reach_exactly_the_trainable_parts(tiny_tokenizer, stage):
    apply_stage(tiny_tokenizer, stage)
    out = tiny_tokenizer.reconstruct(torch.rand(2, 3, 224, 224))
    (out.images.square().mean() + out.features.square().mean()).backward()
    trainable = {1: {"bottleneck", "decoder"}, 2: {"encoder", "bottleneck", "decoder"}}[stage]
    for part in ("encoder", "bottleneck", "decoder"):
        for name, param in ((n, p) for m in tiny_tokenizer.parts()[part] for n, p in m.named_parameters()):
            if part in trainable:
                assert param.grad is not None, f"stage {stage}: no gradient reached {part}.{name}"
            else:
                assert param.grad is None and not param.requires_grad, f"stage {stage}: {part}.{name} trains"


def test_every_parameter_belongs_to_exactly_one_part(tiny_tokenizer):
    in_parts = [id(p) for part in tiny_tokenizer.parts() for p in tiny_tokenizer.part_parameters(part)]
    assert len(in_parts) == len(set(in_parts)) == len(list(tiny_tokenizer.parameters()))


def _count(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("preset", ["unilip_1b", "unilip_2b"])
def test_real_presets_match_published_parameter_counts(preset):
    """Built on `meta` from the Hydra preset: no memory, no weights."""
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base="1.3"):
        cfg = compose(config_name=preset)
    model = instantiate(cfg, device="meta")
    vit = _count(model.vision_tower.parameters())
    decoder = _count(model.decoder.parameters())
    projector = _count(model.multi_modal_projector.parameters())
    print(f"{preset}: ViT {vit / 1e6:.2f}M, projector {projector / 1e6:.2f}M, decoder {decoder / 1e6:.2f}M")
    assert abs(vit - 304e6) / 304e6 < 0.01  # InternViT-300M-448px
    assert abs(decoder - 159e6) / 159e6 < 0.01  # DC-AE f32c32 decoder
    llm = {"unilip_1b": 896, "unilip_2b": 1536}[preset]
    assert projector == 4096 * 2 + 4096 * llm + llm + llm * llm + llm  # LayerNorm, Linear, Linear
    assert all(p.is_meta for p in model.parameters())


def test_save_load_round_trip_is_bit_identical(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    loaded = UniLIPTokenizer.from_pretrained(tmp_path / "tok")
    ours, theirs = tiny_tokenizer.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.config == tiny_tokenizer.config
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(tiny_tokenizer(images), loaded.eval()(images))
    assert torch.equal(load_tokenizer(tmp_path / "tok").state_dict()["down_mlp.1.weight"], ours["down_mlp.1.weight"])


def test_load_rejects_a_tampered_checkpoint(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_tokenizer.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("down_mlp.3.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"missing keys: down_mlp.3.bias.*unexpected keys: extra.weight"):
        UniLIPTokenizer.from_pretrained(tmp_path)


def test_missing_weights_offline_is_a_clear_error(tiny_config):
    with pytest.raises(WeightsNotFoundError, match=r"cannot fetch 'OpenGVLab/InternVL3-1B-hf'.*model.internvl_weights"):
        build_tokenizer(tiny_config, internvl_weights="OpenGVLab/InternVL3-1B-hf")
    with pytest.raises(WeightsNotFoundError, match=r"no such file or directory '/nonexistent/dcae'.*decoder_weights"):
        build_tokenizer(tiny_config, decoder_weights="/nonexistent/dcae")


def test_the_hubs_own_error_text_is_kept(tiny_config, monkeypatch):
    """An auth or disk error must not read as 'no network': the hub's first line is in the message."""

    def refuse(*args, **kwargs):
        raise PermissionError("[Errno 13] Permission denied: '/cache/models--OpenGVLab--InternVL3-1B-hf'\nmore")

    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    with pytest.raises(WeightsNotFoundError) as error:
        build_tokenizer(tiny_config, internvl_weights="OpenGVLab/InternVL3-1B-hf")
    message = str(error.value)
    assert "PermissionError: [Errno 13] Permission denied: '/cache/models--OpenGVLab" in message
    assert "\n" not in message and "more" not in message  # one line


def test_frozen_teacher_equals_the_encoder_and_serves_as_a_loss_target(tiny_tokenizer):
    from unilip.models.tokenizer import FrozenEncoder

    teacher = FrozenEncoder(tiny_tokenizer)
    images = torch.rand(2, 3, 56, 84)  # 84: not square; 56 x 84 are multiples of 28
    target = teacher.features(images)
    with torch.no_grad():
        assert torch.equal(target, tiny_tokenizer.features(images))  # inference mode changes nothing
    assert not target.is_inference() and not target.requires_grad
    student = tiny_tokenizer.features(images)
    torch.nn.functional.mse_loss(student, target).backward()  # usable in autograd as a target
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.grad is not None for p in tiny_tokenizer.vision_tower.parameters()) > 0
