"""Each encoder's way home and back: loading its home checkpoint strictly, exporting into it, verifying the export.

InternViT's (an InternVL checkpoint) is covered by tests/test_internvl.py; these are SigLIP, SigLIP 2
(NaFlex) and DINOv2 with and without registers, loaded back with their own transformers classes.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    Siglip2Config,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from tests.test_encoders import home_features, tiny
from unilip.errors import ConfigError
from unilip.export import main as export_main
from unilip.models import UniLIPTokenizer
from unilip.pretrained import build_tokenizer, home_of
from unilip.training.lineage import TrainedTokenizer, build_teacher

HOME = {
    "siglip": SiglipVisionModel,
    "siglip2": Siglip2VisionModel,
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
}


@pytest.fixture(params=list(HOME))
def kind(request):
    return request.param


def _tokenizer(kind, seed=0):
    torch.manual_seed(seed)
    return UniLIPTokenizer(tiny(kind)).eval()


def _saved(tokenizer, path):
    tokenizer.save_pretrained(path)
    return path


def home_checkpoint(kind, path, seed=1, **changes):
    """A home checkpoint as transformers writes it (random weights), of the tiny preset's size unless changed."""
    config = tiny(kind)
    vision = tiny(kind).vision_config()
    for key, value in changes.items():
        setattr(vision, key, value)
    torch.manual_seed(seed)
    model = HOME[kind](vision).eval()
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(config.image_mean)}))
    return path, model


def _features_of(kind, model, tokenizer, images):
    """`home_features` of a loaded home model: its weights put into a copy of the tokenizer."""
    probe = UniLIPTokenizer(tokenizer.config).eval()
    probe.vision_tower.load_state_dict(model.state_dict())
    return home_features(kind, probe, images)


def test_export_round_trip_equals_the_tokenizers_features(kind, tmp_path):
    tokenizer = _tokenizer(kind)
    out = tmp_path / "exported"
    export_main(["--tokenizer", str(_saved(tokenizer, tmp_path / "tok")), "--out", str(out)])
    model, info = HOME[kind].from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    state, ours = model.state_dict(), tokenizer.vision_tower.state_dict()  # the pooling head / mask token too
    assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in state)
    for size in (224, 448):
        images = torch.rand(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(
                _features_of(kind, model, tokenizer, images), tokenizer.features(images), rtol=0, atol=1e-6
            )


TINY_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)


def published_keys(kind, tmp_path):
    """The tensor names of the hub's home checkpoints (google/siglip-*, google/siglip2-*, facebook/dinov2-*): a
    model of their class built by transformers from a config and saved by it (`save_pretrained` writes the
    published names even where the classes renamed their modules). SigLIP's are whole SiglipModels /
    Siglip2Models, whose vision tower is everything under `vision_model.`; DINOv2's are the Dinov2Model itself."""
    vision = tiny(kind).vision_config().to_dict()
    if kind in ("siglip", "siglip2"):
        config_class = SiglipConfig if kind == "siglip" else Siglip2Config
        config = config_class(vision_config=vision, text_config=TINY_TEXT, bos_token_id=1, eos_token_id=2)
    else:
        config = HOME[kind].config_class(**vision)
    AutoModel.from_config(config).save_pretrained(tmp_path / "published")
    with safe_open(tmp_path / "published" / "model.safetensors", "pt") as published:
        keys = set(published.keys())
    return {key for key in keys if key.startswith("vision_model.")} if kind in ("siglip", "siglip2") else keys


def test_an_export_has_the_hub_checkpoints_key_names(kind, tmp_path):
    """Each transformers release loads the published layout; only some load another (5.23 drops SigLIP's
    `vision_model.` prefix when it saves a SiglipVisionModel, and 5.0 / 4.57 then find every weight missing)."""
    out = home_of(_tokenizer(kind).encoder).export(tmp_path / "out", None, None)
    with safe_open(out / "model.safetensors", "pt") as written:
        assert set(written.keys()) == published_keys(kind, tmp_path)


def test_a_sharded_export_gets_the_prefix_in_every_shard_and_its_index(tmp_path):
    from unilip.pretrained.vision_models import _add_prefix

    tokenizer = _tokenizer("siglip")
    tokenizer.vision_tower.save_pretrained(tmp_path, max_shard_size="20KB")  # a large tower's layout, in small
    _add_prefix(tmp_path, "vision_model.")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index.values()) == {shard.name for shard in shards}
    for shard in shards:
        with safe_open(shard, "pt") as weights:
            assert set(weights.keys()) == {key for key, file in index.items() if file == shard.name}
    assert set(index) == published_keys("siglip", tmp_path / "hub")
    assert home_of(tokenizer.encoder).verify_export(tmp_path).difference == 0


def test_export_into_a_base_carries_its_processor_and_checks_its_size(kind, tmp_path):
    base, _ = home_checkpoint(kind, tmp_path / "base")
    tokenizer = _saved(_tokenizer(kind), tmp_path / "tok")
    export_main(["--tokenizer", str(tokenizer), "--base", str(base), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "preprocessor_config.json").read_text() == (
        base / "preprocessor_config.json"
    ).read_text()

    other, _ = home_checkpoint(kind, tmp_path / "other", hidden_size=48)
    with pytest.raises(
        SystemExit, match=r"^error: --base .* does not fit the tokenizer preset \(hidden_size: 48 != 32"
    ):
        export_main(["--tokenizer", str(tokenizer), "--base", str(other), "--out", str(tmp_path / "new" / "out")])
    assert not (tmp_path / "new").exists()


def test_a_base_of_another_encoder_is_refused(tmp_path):
    base, _ = home_checkpoint("siglip", tmp_path / "siglip")
    tokenizer = _saved(_tokenizer("dinov2_with_registers"), tmp_path / "tok")
    with pytest.raises(SystemExit, match=r"^error: --base .* is a 'siglip_vision_model' checkpoint, the tokenizer's"):
        export_main(["--tokenizer", str(tokenizer), "--base", str(base), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_internvit_export_needs_its_internvl_base(tmp_path):
    tokenizer = _saved(_tokenizer_internvit(), tmp_path / "tok")
    with pytest.raises(SystemExit, match=r"^error: --base is required for an InternViT tokenizer"):
        export_main(["--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def _tokenizer_internvit():
    torch.manual_seed(0)
    return UniLIPTokenizer(tiny("internvit"))


def test_a_failed_verification_exits_without_a_checkpoint(tmp_path, monkeypatch):
    """An export whose config computes other features (here: another LayerNorm epsilon) is caught by the check."""
    from unilip.pretrained.vision_models import VisionModelHome

    write = VisionModelHome.export

    def tampered(self, out_dir, base, dtype):
        written = write(self, out_dir, base, dtype)
        config = json.loads((written / "config.json").read_text())
        (written / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 0.5}))
        return written

    monkeypatch.setattr(VisionModelHome, "export", tampered)
    tokenizer = _saved(_tokenizer("dinov2_with_registers"), tmp_path / "tok")
    with pytest.raises(SystemExit, match=r"^error: the exported model's image features differ .* by \S+ \(tolerance"):
        export_main(["--tokenizer", str(tokenizer), "--out", str(tmp_path / "new" / "out")])
    assert not (tmp_path / "new").exists()  # neither the output, nor the staging directory, nor its parent


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_the_verification_refuses_a_file_without_the_hubs_prefix(kind, tmp_path, monkeypatch):
    """A SigLIP file without the `vision_model.` prefix (what 5.23's `save_pretrained` writes) loads in 5.23 as a
    SiglipVisionModel, but not as the hub's checkpoints load: the check tries that too, and nothing is written."""
    from unilip.pretrained import vision_models

    def without_prefix(out_dir, prefix):
        weights = out_dir / "model.safetensors"
        state = load_file(weights)
        save_file({key.removeprefix(prefix): value for key, value in state.items()}, weights, {"format": "pt"})

    monkeypatch.setattr(vision_models, "_add_prefix", without_prefix)
    tokenizer = _saved(_tokenizer(kind), tmp_path / "tok")
    with pytest.raises(
        SystemExit, match=r"^error: exported checkpoint .* does not load"
    ):  # as a whole model, or at all
        export_main(["--tokenizer", str(tokenizer), "--out", str(tmp_path / "new" / "out")])
    assert not (tmp_path / "new").exists()


def test_a_bfloat16_export_is_checked_as_tightly_as_float32(tmp_path):
    home = home_of(_tokenizer("siglip").encoder)
    for dtype in (torch.float32, torch.bfloat16):
        out = home.export(tmp_path / str(dtype), None, dtype)
        check = home.verify_export(out)
        assert check.dtype == dtype and check.ok and check.difference <= 1e-5
        if dtype == torch.float32:
            assert check.rounding == 0
        else:
            assert check.rounding > 10 * check.tolerance


def test_loading_the_home_checkpoint(kind, tmp_path):
    path, model = home_checkpoint(kind, tmp_path / "home")
    tokenizer = build_tokenizer(tiny(kind), encoder_weights=str(path)).eval()
    ours, theirs = tokenizer.vision_tower.state_dict(), model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.features(images), _features_of(kind, model, tokenizer, images))
    assert not any(p.requires_grad for p in tokenizer.encoder.unused_parameters())  # still frozen after loading


def test_a_full_siglip_checkpoint_gives_its_vision_tower(tmp_path):
    """google/siglip2-* checkpoints are whole SiglipModels (vision_model.*, text_model.*, logit_scale)."""
    config = tiny("siglip")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    torch.manual_seed(1)
    full = SiglipModel(SiglipConfig(vision_config=config.vision, text_config=text, bos_token_id=1, eos_token_id=2))
    full.save_pretrained(tmp_path / "siglip")
    tokenizer = build_tokenizer(config, encoder_weights=str(tmp_path / "siglip"))
    vision = full.vision_model.state_dict()  # 5.0: the transformer itself; later: a SiglipVisionModel around none
    assert all(torch.equal(tokenizer.encoder.core.state_dict()[k], vision[k]) for k in vision)


def test_a_home_checkpoint_of_another_size_or_encoder_is_one_clear_error(tmp_path):
    other, _ = home_checkpoint("dinov2_with_registers", tmp_path / "wide", hidden_size=48, num_register_tokens=2)
    with pytest.raises(ConfigError, match=r"does not fit the tokenizer preset \(hidden_size: 48 != 32; .*"):
        build_tokenizer(tiny("dinov2_with_registers"), encoder_weights=str(other))
    with pytest.raises(ConfigError, match=r"num_register_tokens: 2 != 4"):
        build_tokenizer(tiny("dinov2_with_registers"), encoder_weights=str(other))
    siglip, _ = home_checkpoint("siglip", tmp_path / "siglip")
    with pytest.raises(ConfigError, match=r"is a 'siglip_vision_model' checkpoint, the tokenizer's encoder is dinov2 "):
        build_tokenizer(tiny("dinov2"), encoder_weights=str(siglip))
    with pytest.raises(ConfigError, match=r"InternVL weights for a siglip encoder; use model.encoder_weights"):
        build_tokenizer(tiny("siglip"), internvl_weights=str(siglip))


def test_the_teacher_can_come_from_the_home_checkpoint(kind, tmp_path):
    """Stage 2 from a tokenizer whose lineage names the original encoder's home checkpoint."""
    path, model = home_checkpoint(kind, tmp_path / "home")
    trained = TrainedTokenizer(_tokenizer(kind, seed=5), "run", {"encoder_trained": True, "teacher": str(path)})
    teacher, source = build_teacher(None, trained, tiny(kind))
    assert source == str(path)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = _features_of(kind, model, trained.tokenizer, images)
    torch.testing.assert_close(teacher.features(images), expected, rtol=0, atol=1e-6)


def test_a_teacher_of_another_encoder_is_refused(tmp_path):
    _tokenizer("siglip").save_pretrained(tmp_path / "siglip", training={"stage": 1, "encoder_trained": False})
    trained = TrainedTokenizer(_tokenizer("dinov2"), "run", {"encoder_trained": True, "teacher": None})
    with pytest.raises(ConfigError, match=r"holds another encoder than the chosen model preset \(differs in encoder"):
        build_teacher(str(tmp_path / "siglip"), trained, tiny("dinov2"))


def test_every_encoder_has_a_home_and_a_home_serves_only_its_own_kind():
    """The networks (`ENCODERS`) and their homes (`HOMES`, in the package the networks never import) are two
    registries: an encoder added to one and forgotten in the other could be trained but never loaded or exported."""
    from unilip.models.encoders import ENCODERS
    from unilip.pretrained import HOMES

    assert HOMES.keys() == ENCODERS.keys()
    assert all(home.kind == kind for kind, home in HOMES.items())
    siglip = _tokenizer("siglip").encoder
    assert home_of(siglip).encoder is siglip
    with pytest.raises(TypeError, match="home of dinov2 encoders, not of siglip"):
        HOMES["dinov2"](siglip)
