"""What the unified task's networks are given, through `train()` on the loader's uint8 photo batches: the
captioner and the reward encoders see float images in [0, 1]; the policy update recomputes each caption's (each
sample's) log-probabilities under the image it was sampled from, so its first ratio on a rollout is exactly 1."""

import json

import lightning as L
import pytest
import torch

import unilip.tasks.unified.grpo as grpo_module
import unilip.tasks.unified.module as unified_module
from tests import sampling_helpers
from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.training.run import train


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return sampling_helpers.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


def _cfg(photos_dir, tmp_path, generator_dir, stage: int, *extra: str, steps: int = 1):
    return compose_train(
        [
            "experiment=unified/quickstart",
            f"stage={stage}",
            f"paths.data_dir={photos_dir}",
            f"paths.runs_dir={tmp_path}",
            f"run_dir={tmp_path / f'stage{stage}'}",
            f"generator_from={generator_dir}",
            "captioner_from=base",
            "data.num_workers=0",
            "data.val_num_workers=0",
            "data.pin_memory=false",
            "data.val_batch_size=2",
            "trainer.enable_progress_bar=false",
            f"stages.stage{stage}.max_steps={steps}",
            f"data.train_batches_per_epoch={steps}",
            "module.group_size=2",
            "captioner.max_new_tokens=4",
            "module.rendering.steps=1",
            "module.sampling.steps=2",
            *extra,
        ]
    )


def _summary(images: torch.Tensor) -> dict:
    return {"dtype": str(images.dtype), "min": float(images.min()), "max": float(images.max())}


class InputSpy(L.Callback):
    """Records the dtype and range of every image batch the loader gives, the captioner encodes, and the
    reward's encoders receive (sources and renderings apart), into the JSON file `path`."""

    def __init__(self, path: str):
        self.path, self.seen = path, {"loader": [], "captioner": [], "source": [], "rendered": [], "encoder": []}

    def _wrap(self, owner, name: str, record) -> None:
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            record(*args)
            return original(*args, **kwargs)

        setattr(owner, name, spy)  # an instance attribute: nn.Module.__call__ finds it first

    def on_fit_start(self, trainer, pl_module) -> None:
        networks = pl_module.networks
        self._wrap(networks.captioner, "image_features", lambda images: self.seen["captioner"].append(_summary(images)))

        def similarity(source, rendered):
            self.seen["source"].append(_summary(source))
            self.seen["rendered"].append(_summary(rendered))

        self._wrap(networks.similarity, "forward", similarity)
        for encoder in networks.similarity.encoders:
            self._wrap(encoder, "forward", lambda images: self.seen["encoder"].append(_summary(images)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["loader"].append(_summary(batch["image"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["loader"].append(_summary(batch["image"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        with open(self.path, "w") as handle:
            json.dump(self.seen, handle)


@pytest.mark.parametrize("stage", [1, 2])
def test_the_networks_see_float_images_in_0_1_from_uint8_batches(photos_dir, generator_dir, stage, tmp_path):
    """Stage 1 (captions rendered by the generator) and stage 2 (one caption, the generator's SDE samples):
    the loader gives uint8 in [0, 255]; the captioner's encoder and every reward encoder get float32 in [0, 1]
    (an image left in [0, 255], doubled, or divided twice would not be). The generator itself is given
    captions, never an image: what it renders reaches the reward in [0, 1] too."""
    seen_file = tmp_path / "seen.json"
    spy = ["+callbacks.spy._target_=tests.test_unified_rollouts.InputSpy", f"+callbacks.spy.path={seen_file}"]
    train(_cfg(photos_dir, tmp_path, generator_dir, stage, *spy))
    seen = json.loads(seen_file.read_text())
    assert seen["loader"] and all(s["dtype"] == "torch.uint8" and s["max"] > 127 for s in seen["loader"])
    for what in ("captioner", "source", "rendered", "encoder"):
        assert seen[what], what  # training and validation both passed through it
        assert all(s["dtype"] == "torch.float32" and s["min"] >= 0 and s["max"] <= 1 for s in seen[what]), what
    # the photos have bright pixels: a batch divided by 255 twice (max < 0.004) is not [0, 1] either
    assert all(s["max"] > 0.5 for s in seen["captioner"] + seen["source"])


@pytest.mark.numerics
@pytest.mark.parametrize("stage", [1, 2])
def test_the_first_update_of_a_rollout_has_ratio_one(photos_dir, generator_dir, stage, tmp_path, monkeypatch):
    """With two updates per rollout the old log-probabilities are the ones recorded while sampling. The first
    update recomputes them with the same weights, each caption under the image it was sampled from (stage 2:
    each SDE step under its own caption's condition), so p / p_old is 1 on every element up to rounding; after
    one optimizer step (the second update) it is not."""
    calls = []

    def spy(log_probs, old_log_probs, advantages, mask=None, *args, **kwargs):
        kept = mask if mask is not None else torch.ones_like(log_probs, dtype=torch.bool)
        calls.append((log_probs.detach() - old_log_probs.detach())[kept])
        return grpo_loss(log_probs, old_log_probs, advantages, mask, *args, **kwargs)

    grpo_loss = unified_module.grpo_loss
    monkeypatch.setattr(unified_module, "grpo_loss", spy)  # stage 1 calls it from the module
    monkeypatch.setattr(grpo_module, "grpo_loss", spy)  # stage 2 through grpo.flow_step_loss
    extra = ["module.updates_per_rollout=2", "module.kl_weight=0"]
    train(_cfg(photos_dir, tmp_path, generator_dir, stage, *extra, f"stages.stage{stage}.lr=0.05", steps=2))
    per_update = 1 if stage == 1 else 2  # stage 2: one call per SDE step
    assert len(calls) == 2 * per_update
    first, second = torch.cat(calls[:per_update]), torch.cat(calls[per_update:])
    assert first.numel() >= 4
    # sampling (cached, step by step) and the update (one pass) round differently: float32, a few ulps of a
    # log-probability of order 1-10 (5e-7 measured here; 2e-5 allows 40 ulps). Scored under another image (the
    # rows shuffled), the captions were 0.16 off, the SDE steps 1.5e-3.
    assert first.abs().max() < 2e-5, first
    assert second.abs().max() > 1e-3  # the ratio is not 1 by construction
