"""The DC-AE's part of the latent cache's fingerprint (`dcae_identity`): what makes two stage-1 latent spaces the
same, for a random DC-AE (tiny preset) and for pretrained weights in a folder (a pipeline's `vae/` or the
autoencoder itself)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderDC
from omegaconf import OmegaConf

from unilip.models.generator import DiTPreset
from unilip.models.latents import build_dcae
from unilip.tasks.generation.target_cache import dcae_identity

TINY = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/dit/tiny.yaml"), resolve=True)


def _preset(**kw) -> DiTPreset:
    return DiTPreset(transformer=TINY["transformer"], **kw)


def test_a_random_dcae_is_identified_by_the_seed_it_is_built_with_its_config_and_scale():
    dcae = {**TINY["dcae"], "scaling_factor": 0.41}
    identity = dcae_identity(_preset(dcae=dcae, seed=3))
    with torch.random.fork_rng():
        torch.manual_seed(identity["random_seed"])
        rebuilt = AutoencoderDC(**identity["config"])
    built = build_dcae(_preset(dcae=dcae, seed=3))
    for name, tensor in built.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[name]), name  # the recorded seed is the one used
    assert identity["scaling_factor"] == 0.41 and identity["config"] == dcae
    assert dcae_identity(_preset(dcae=dcae, seed=3)) == identity
    assert dcae_identity(_preset(dcae=dcae, seed=4)) != identity
    unscaled = {key: value for key, value in TINY["dcae"].items() if key != "scaling_factor"}
    assert dcae_identity(_preset(dcae=unscaled, seed=3))["scaling_factor"] == 1.0  # diffusers' default


def test_pretrained_dcae_weights_are_identified_by_their_bytes_config_and_scale(tmp_path):
    """A pipeline folder and its `vae/` are the same DC-AE; so is a copy elsewhere; diffusers' own bookkeeping
    (`_diffusers_version`) changes nothing; a changed weight or config value does."""
    build_dcae(_preset(dcae={**TINY["dcae"], "scaling_factor": 0.41})).save_pretrained(tmp_path / "pipe" / "vae")
    identity = dcae_identity(_preset(dcae_weights=str(tmp_path / "pipe")))
    assert dcae_identity(_preset(dcae_weights=str(tmp_path / "pipe" / "vae"))) == identity
    assert identity["scaling_factor"] == 0.41 and isinstance(identity["scaling_factor"], float)
    assert identity["config"]["latent_channels"] == 32 and not any(key.startswith("_") for key in identity["config"])
    assert len(identity["weights_sha256"]) == 64 and "random_seed" not in identity
    shutil.copytree(tmp_path / "pipe" / "vae", tmp_path / "copy")
    assert dcae_identity(_preset(dcae_weights=str(tmp_path / "copy"))) == identity

    config_file = tmp_path / "copy" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_diffusers_version": "0.0.1"}))
    assert dcae_identity(_preset(dcae_weights=str(tmp_path / "copy"))) == identity
    config_file.write_text(json.dumps({**config, "scaling_factor": 0.5}))
    changed = dcae_identity(_preset(dcae_weights=str(tmp_path / "copy")))
    assert changed["scaling_factor"] == 0.5 and changed["config"]["scaling_factor"] == 0.5
    assert changed["weights_sha256"] == identity["weights_sha256"]

    model = AutoencoderDC.from_pretrained(tmp_path / "pipe" / "vae")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "edited")
    assert dcae_identity(_preset(dcae_weights=str(tmp_path / "edited")))["weights_sha256"] != identity["weights_sha256"]


def test_a_dcae_from_the_hub_downloads_only_the_autoencoders_files(tmp_path, monkeypatch):
    """A SANA pipeline id: the DC-AE's config and weights in `vae/` are fetched, not the transformer or the text
    encoder (gigabytes); of an autoencoder's own repo, its config and weights."""
    import fnmatch

    import huggingface_hub

    build_dcae(_preset(dcae=TINY["dcae"])).save_pretrained(tmp_path / "snapshot" / "vae")
    asked = []

    def snapshot_download(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    identity = dcae_identity(_preset(dcae_weights="Efficient-Large-Model/Sana_600M_1024px_diffusers"))
    assert identity == dcae_identity(_preset(dcae_weights=str(tmp_path / "snapshot" / "vae")))
    ((repo, patterns),) = asked
    assert repo == "Efficient-Large-Model/Sana_600M_1024px_diffusers"
    repository = ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                  "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                  "text_encoder/model.safetensors", "config.json", "model.safetensors", "vae/README.md"]  # fmt: skip
    fetched = [name for name in repository if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    # huggingface_hub matches with fnmatch, whose `*` crosses `/`: a `*.safetensors` would fetch the transformer
    assert fetched == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors", "config.json"]
    from unilip.models.generator import diffusers_files  # the DiT from the same pipeline: the same rule

    transformer = [name for name in repository if any(fnmatch.fnmatch(name, p) for p in diffusers_files("transformer"))]
    assert transformer == ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "config.json"]
    autoencoder_repository = ["config.json", "diffusion_pytorch_model.safetensors", "README.md"]
    assert [name for name in autoencoder_repository if any(fnmatch.fnmatch(name, p) for p in patterns)] == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def test_dcae_weights_that_are_missing_or_broken_are_named_with_the_option_to_set(tmp_path):
    """Each is one `error:` line (a UserError); a config without `scaling_factor` is diffusers' default, 1."""
    import pytest

    from unilip.errors import UserError

    absent = tmp_path / "absent"
    with pytest.raises(UserError) as error:
        dcae_identity(_preset(dcae_weights=str(absent)))
    assert str(error.value) == (
        f"DC-AE weights: no such file or directory '{absent}'; set dit.dcae_weights=<an existing path or hub id>"
    )
    build_dcae(_preset(dcae=TINY["dcae"])).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "scaling_factor"})
    )
    assert dcae_identity(_preset(dcae_weights=str(tmp_path / "vae")))["scaling_factor"] == 1.0
    (tmp_path / "vae" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"^DC-AE config '.*config\.json' is not valid JSON"):
        dcae_identity(_preset(dcae_weights=str(tmp_path / "vae")))


def test_a_tokenizer_that_was_not_loaded_refuses_to_encode_naming_it():
    import pytest

    from unilip.models.tokenizer import TokenizerConfig
    from unilip.tasks.generation.target_cache import TokenizerNotLoaded

    stand_in = TokenizerNotLoaded(TokenizerConfig(vision={}, llm_hidden_size=64), "runs/t/tokenizer")
    message = (
        "the tokenizer runs/t/tokenizer was not loaded (every training target is cached and the run does not "
        "validate), yet something asked it to encode or decode"
    )
    for call in (stand_in.encode, stand_in.decode, stand_in.features, stand_in):
        with pytest.raises(RuntimeError) as error:
            call(torch.zeros(1, 3, 8, 8))
        assert str(error.value) == message
