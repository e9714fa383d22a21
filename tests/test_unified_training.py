"""The unified task through `train()` as `python train.py task=unified` runs it: stage 1 trains only the
captioner's adapters, stage 2 only the DiT's (from stage 1's captioner, by run name), every base weight stays
bit-identical, every reward term is logged, results load where the other tools read them, resume is exact."""

import csv
import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests import sampling_helpers
from tests.conftest import compose_train
from tests.generation_helpers import (
    fingerprint,
    one_thread,  # noqa: F401  (autouse fixture)
)
from unilip.models.presets import CONF_DIR
from unilip.training.config import ConfigError
from unilip.training.run import train


class UnifiedSnapshot(L.Callback):
    """Hashes of every network's base weights (adapters left out) at the start and end of fit: `frozen.json`."""

    def __init__(self, path: str):
        self.path, self.hashes = path, {}

    def _record(self, module, when: str) -> None:
        networks = module.networks
        for name in ("captioner", "generator", "conditioner", "latents", "similarity"):
            state = {k: v for k, v in getattr(networks, name).state_dict().items() if ".lora_" not in k}
            holder = torch.nn.Module()
            holder.state_dict = lambda state=state: state
            self.hashes[f"{name}_{when}"] = fingerprint([holder])
        self.hashes[f"trained_{when}"] = fingerprint([module.trained])
        if networks.reference_dit is not None:
            self.hashes[f"reference_{when}"] = fingerprint([networks.reference_dit])

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record(pl_module, "start")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._record(pl_module, "end")
        with open(self.path, "w") as handle:
            json.dump(self.hashes, handle)


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return sampling_helpers.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _cfg(photos_dir, runs_dir, generator_dir, stage, *extra, name="loop", steps=3):
    run_dir = runs_dir / name / "unified" / f"stage{stage}"
    return compose_train(
        [
            "experiment=unified/quickstart",
            f"stage={stage}",
            f"name={name}",
            f"paths.data_dir={photos_dir}",
            f"paths.runs_dir={runs_dir}",
            f"run_dir={run_dir}",
            f"generator_from={generator_dir}",
            "data.num_workers=0",
            "data.val_num_workers=0",
            "data.pin_memory=false",
            "data.val_batch_size=2",
            "trainer.enable_progress_bar=false",
            *([f"stages.stage{stage}.max_steps={steps}"] if stage in (1, 2) else []),
            f"data.train_batches_per_epoch={steps}",
            "module.group_size=2",
            "captioner.max_new_tokens=4",
            "module.rendering.steps=1",
            "module.sampling.steps=2",
            "+callbacks.snapshot._target_=tests.test_unified_training.UnifiedSnapshot",
            f"+callbacks.snapshot.path={runs_dir / f'{name}-stage{stage}.json'}",
            *extra,
        ]
    )


def _logged(run_dir) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return [row for row in csv.DictReader(handle) if row.get("reward/total")]


@pytest.fixture(scope="module")
def stage1(photos_dir, runs_dir, generator_dir):
    return train(_cfg(photos_dir, runs_dir, generator_dir, 1))


@pytest.fixture(scope="module")
def stage2(photos_dir, runs_dir, generator_dir, stage1):
    return train(_cfg(photos_dir, runs_dir, generator_dir, 2))  # reads stage 1's captioner by run name


def test_stage1_trains_only_the_captioners_adapters(stage1, runs_dir):
    hashes = json.loads((runs_dir / "loop-stage1.json").read_text())
    for name in ("captioner", "generator", "conditioner", "latents", "similarity"):
        assert hashes[f"{name}_start"] == hashes[f"{name}_end"], name  # every base weight, bit for bit
    assert hashes["trained_start"] != hashes["trained_end"]
    state = torch.load(stage1 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {key.split(".")[0] for key in state} == {"trained", "nonfinite"}  # adapters only, no frozen network
    assert all("__lora_" in key and key.startswith("trained.captioner") for key in state if key.startswith("trained"))
    rows = _logged(stage1)
    assert len(rows) == 3
    for term in ("reward/total", "reward/sim/dinov2", "reward/sim/siglip", "reward/length", "reward/format",
                 "caption/length", "caption/finished", "loss/kl", "grpo/clip_fraction"):  # fmt: skip
        assert all(row[term] != "" for row in rows), term
    for row in rows:  # the total is the weighted similarity (tiny reward: 0.5 each; length, format off)
        expected = 0.5 * float(row["reward/sim/dinov2"]) + 0.5 * float(row["reward/sim/siglip"])
        assert float(row["reward/total"]) == pytest.approx(expected, abs=1e-5)
        assert 1 <= float(row["caption/length"]) <= 4
    # saved as a peft folder for transformers' InternVL: its LLM body is `model.language_model`, and peft's keys are
    # `base_model.model.<name>` without the adapter's name
    adapters = load_file(stage1 / "captioner" / "adapter_model.safetensors")
    trained = {k[len("trained.captioner__") :].replace("__", "."): v for k, v in state.items() if "captioner" in k}
    trained = {"base_model.model." + k.replace("model.", "model.language_model.", 1).replace(".default.", "."): v
               for k, v in trained.items()}  # fmt: skip
    assert adapters.keys() == trained.keys() and all(torch.equal(adapters[k], trained[k]) for k in adapters)
    assert list((stage1 / "samples").glob("unified_step*.png"))


def test_stage2_trains_the_dit_on_stage1s_captions(stage1, stage2, runs_dir, generator_dir):
    from unilip.pipelines import UniLIPPipeline

    hashes = json.loads((runs_dir / "loop-stage2.json").read_text())
    for name in ("captioner", "generator", "conditioner", "latents", "similarity"):
        assert hashes[f"{name}_start"] == hashes[f"{name}_end"], name
    state = torch.load(stage2 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(key.startswith("trained.dit__") and "__lora_" in key for key in state if key.startswith("trained"))
    assert all(row["loss/grpo"] != "" for row in _logged(stage2))
    # the result is a saved generator (adapters merged) every sampling tool reads; only the adapted layers moved
    before = load_file(generator_dir / "model.safetensors")
    after = load_file(stage2 / "generator" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved and all(key.startswith("dit.") and key.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0")
                         for key in moved)  # fmt: skip
    meta = json.loads((stage2 / "generator" / "config.json").read_text())
    assert meta["unified"]["captioner_from"] == str(stage1 / "captioner") and meta["init_from"] == str(generator_dir)
    images = UniLIPPipeline.from_pretrained(stage2 / "generator")(["a cat"], size=56, num_inference_steps=2)
    assert images.shape == (1, 3, 56, 56)
    adapters = load_file(stage1 / "captioner" / "adapter_model.safetensors")  # the captioner it used, saved beside
    saved = load_file(stage2 / "captioner" / "adapter_model.safetensors")
    assert saved.keys() == adapters.keys() and all(torch.equal(adapters[k], v) for k, v in saved.items())


def test_a_fully_trained_dit_keeps_a_frozen_reference_and_several_updates_per_rollout_clip(
    photos_dir, runs_dir, generator_dir, stage1, tmp_path
):
    overrides = [f"captioner_from={stage1}", "dit_training.mode=full", "module.updates_per_rollout=2"]
    run = train(_cfg(photos_dir, tmp_path, generator_dir, 2, *overrides, "stages.stage2.lr=0.05", name="full"))
    hashes = json.loads((tmp_path / "full-stage2.json").read_text())
    assert hashes["reference_start"] == hashes["reference_end"] != hashes["trained_end"]  # the KL's reference
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3  # max_steps optimizer steps: 2 updates on the first rollout, 1 on the second
    assert all(key.startswith("trained.dit__") and "lora" not in key for key in state["state_dict"] if "trained" in key)
    before = load_file(generator_dir / "model.safetensors")
    after = load_file(run / "generator" / "model.safetensors")
    changed = [k for k in before if k.startswith("dit.") and not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * sum(k.startswith("dit.") for k in before)  # the whole DiT trains
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("dit."))
    ratios = [float(row["grpo/ratio"]) for row in _logged(run)]
    assert ratios and all(r > 0 for r in ratios)


@pytest.mark.numerics
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_exact(photos_dir, runs_dir, generator_dir, stage1, stage, tmp_path):
    extra = [f"captioner_from={stage1}"] if stage == 2 else []
    straight = train(_cfg(photos_dir, tmp_path, generator_dir, stage, *extra, name="straight", steps=4))
    stop = ["+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.step=2"]
    train(_cfg(photos_dir, tmp_path, generator_dir, stage, *extra, *stop, name="resumed", steps=4))
    resumed = train(_cfg(photos_dir, tmp_path, generator_dir, stage, *extra, "resume=auto", name="resumed", steps=4))
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 4
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    rewards = [[row["reward/total"] for row in _logged(run)] for run in (straight, resumed)]
    assert rewards[0] == rewards[1]  # the same rollouts, step for step, logged once each


def test_config_mistakes_fail_with_one_clear_error(photos_dir, runs_dir, generator_dir, tmp_path):
    cases = {
        (1, "generator_from=null"): "needs generator_from",
        (3,): "stage=3 is not a unified stage",
        (1, "module.group_size=1"): r"group_size=1: must be an integer >= 2 \(GRPO compares G outputs",
        (1, "module.sampling.noise_level=0"): "needs noise",
        (2,): "stage 2 needs captioner_from",
        (1, f"generator_from={tmp_path}"): "holds no saved generator",
        (2, "dit_training.mode=half"): "use lora or full",
    }
    for (stage, *overrides), message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train(_cfg(photos_dir, tmp_path, generator_dir, stage, *overrides, name="fresh"))
    assert not (tmp_path / "fresh").exists()


UNIFIED_EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment" / "unified").glob("*.yaml"))


@pytest.mark.parametrize("experiment", UNIFIED_EXPERIMENTS)
@pytest.mark.parametrize("stage", [1, 2])
def test_every_unified_experiment_composes_into_a_coherent_loop(experiment, stage):
    from omegaconf import OmegaConf

    cfg = compose_train([f"experiment=unified/{experiment}", f"stage={stage}", "run_dir=/tmp/x"])
    OmegaConf.resolve(cfg)
    assert cfg.task == "unified" and cfg.trainer.max_steps == cfg.recipe.max_steps
    assert cfg.module.lr == cfg.recipe.lr and cfg.data.image_size == cfg.recipe.image_size
    assert cfg.data.resize == "square" and cfg.module.group_size >= 2 and cfg.reward.encoders
    if experiment != "quickstart":  # GRPO as DeepSeekMath / Flow-GRPO set it; UAE's four encoders
        assert (cfg.module.clip_range, cfg.module.kl_weight, cfg.module.sampling.noise_level) == (0.2, 0.04, 0.7)
        assert cfg.module.sampling.steps == 10 and cfg.module.rendering.guidance_scale == 4.5
        assert [e.name for e in cfg.reward.encoders] == ["clip", "dinov2", "dinov3", "siglip"]


def test_fsdp_refuses_trained_parameters_it_would_leave_whole():
    """A trained parameter outside the sharded modules (e.g. adapters on the LM head) would get no gradient
    reduction under FSDP and drift apart between the ranks: refused in one line naming it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from unilip.tasks.unified.sharding import check_all_sharded

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh))
        check_all_sharded({"captioner.model.layers.0.q_proj.lora_A.default.weight": sharded})
        whole = torch.nn.Parameter(torch.zeros(4, 2))
        with pytest.raises(ConfigError, match=r"lie outside them: captioner\.lm_head\.lora_A.*trainer=ddp"):
            check_all_sharded({"captioner.model.layers.0.q": sharded, "captioner.lm_head.lora_A.default.weight": whole})
    finally:
        torch.distributed.destroy_process_group()
