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
