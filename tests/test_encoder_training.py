"""Stages 1 and 2 with every encoder, on the bundled photos: what trains, the teacher, chaining, resume, eval.py.

The InternViT tokenizer's stages are tests/test_training.py; these run the tiny SigLIP and DINOv2
presets through the same configs (`model=tiny_siglip2`, `model=tiny_dinov2`).
"""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_eval, compose_train, quick_overrides
from unilip.evaluation.run import evaluate
from unilip.training.run import train

PRESETS = ["tiny_siglip2", "tiny_dinov2"]
SMALL = ["data.batch_size=4", "loss.perceptual_weight=0", "data.train_batches_per_epoch=6"]


def _run(data_root, run_dir, *extra, runs_dir=None):
    cfg = compose_train(quick_overrides(data_root, run_dir, *extra))
    if runs_dir is not None:  # where runs are found by name (stage 2 finds stage 1's)
        cfg.paths.runs_dir = str(runs_dir)
    return train(cfg)


def _metric(run_dir, key):
    with open(run_dir / "logs" / "metrics.csv") as file:
        return [float(row[key]) for row in csv.DictReader(file) if row.get(key)]


def _initial_weights(preset):
    from hydra.utils import instantiate

    cfg = compose_train(["experiment=quickstart", f"model={preset}"])
    torch.manual_seed(cfg.seed)  # train() seeds the same way: the same initial tokenizer
    return instantiate(cfg.model).state_dict()


@pytest.fixture(scope="module", params=PRESETS)
def stages(request, photos_dir, tmp_path_factory):
    """Stage 1 (12 steps) and stage 2 chained by run name (12 steps, distillation), 64 px, for one encoder."""
    preset = request.param
    runs = tmp_path_factory.mktemp(preset)
    common = [f"model={preset}", "name=enc", *SMALL, "stages.stage1.image_size=64", "stages.stage2.image_size=64"]
    tokenizer_runs = runs / "enc" / "tokenizer"
    _run(photos_dir, tokenizer_runs / "stage1", "stage=1", "stages.stage1.max_steps=12", *common, runs_dir=runs)
    stage2 = ["stage=2", "stages.stage2.max_steps=12", "stages.stage2.gan_start_step=1000"]
    _run(photos_dir, tokenizer_runs / "stage2", *stage2, *common, runs_dir=runs)  # no init_from: found by name
    return preset, tokenizer_runs, _initial_weights(preset)


def test_stage1_freezes_the_encoder_bit_for_bit(stages):
    preset, runs, before = stages
    after = load_file(runs / "stage1" / "tokenizer" / "model.safetensors")
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith("vision_tower.")]
    trained = [k for k in before if k.startswith(("residual_blocks.", "down_mlp.", "decoder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    l2 = _metric(runs / "stage1", "loss/l2")
    print(f"{preset} stage 1 L2: first 3 steps {sum(l2[:3]) / 3:.4f}, last 3 {sum(l2[-3:]) / 3:.4f}")
    assert sum(l2[-3:]) < 0.8 * sum(l2[:3])


def test_stage2_trains_the_encoder_and_distillation_keeps_its_features(stages):
    preset, runs, _ = stages
    first = load_file(runs / "stage1" / "tokenizer" / "model.safetensors")
    second = load_file(runs / "stage2" / "tokenizer" / "model.safetensors")
    state = torch.load(runs / "stage2" / "checkpoints" / "last.ckpt", weights_only=True)
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    unused = UniLIPTokenizer(tokenizer_preset(preset)).encoder.unused_parameters()  # pooling head / mask token
    encoder = [k for k in first if k.startswith("vision_tower.")]
    moved = [k for k in encoder if not torch.equal(first[k], second[k])]
    assert len(moved) > len(encoder) // 2  # the encoder trains in stage 2
    kept = {k for k in encoder if "head." in k or "mask_token" in k}
    assert len(kept) == len(unused) and all(torch.equal(first[k], second[k]) for k in kept)
    assert not any(f"ema.{k.replace('.', '__')}" in state["state_dict"] for k in kept)  # not even in the EMA
    cosine = _metric(runs / "stage2", "val/teacher_cosine")
    print(f"{preset} stage 2 teacher-feature cosine: {cosine}")
    assert cosine[-1] >= 0.99


def test_eval_measures_feature_fidelity_against_the_original_encoder(stages, photos_dir, tmp_path):
    _, runs, _ = stages
    results = evaluate(compose_eval(photos_dir, tmp_path / "out", f"ckpt={runs / 'stage2'}", "protocol=64"))
    agg = results["aggregate"]
    assert results["images"] == 12 and agg["feature_cosine"]["mean"] >= 0.99
    assert any("feature fidelity measured against the encoder of" in note for note in results["notes"])
    assert str(runs / "stage1") in " ".join(results["notes"])  # the teacher found through the lineage


@pytest.mark.numerics
@pytest.mark.slow  # three short runs per encoder; resume itself is tested with InternViT in the default suite
@pytest.mark.parametrize("preset", PRESETS)
def test_resume_is_bit_identical(preset, photos_dir, tmp_path):
    common = [f"model={preset}", "stage=1", "stages.stage1.max_steps=6", "stages.stage1.image_size=64", *SMALL]
    common += ["data.train_batches_per_epoch=3", "checkpoint_every=3"]
    _run(photos_dir, tmp_path / "straight", *common)
    stopped = tmp_path / "stopped"
    _run(photos_dir, stopped, *common, "+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.step=3")
    _run(photos_dir, stopped, *common, "resume=auto")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"resumed run differs in {different[:5]}"


@pytest.mark.slow  # two 40-step stage-2 runs per encoder
@pytest.mark.parametrize("preset", PRESETS)
def test_without_distillation_the_features_drift(preset, photos_dir, tmp_path):
    """What the distillation term buys: the same stage 2 with weight 0 moves the features away from the teacher."""
    common = [f"model={preset}", *SMALL, "stages.stage1.image_size=64", "stages.stage2.image_size=64"]
    _run(photos_dir, tmp_path / "s1", "stage=1", "stages.stage1.max_steps=6", *common)
    cosine = {}
    for weight in (1.0, 0.0):
        run = tmp_path / f"distill{weight}"
        stage2 = [
            "stage=2",
            f"init_from={tmp_path / 's1'}",
            "stages.stage2.max_steps=40",
            "data.train_batches_per_epoch=20",
        ]
        _run(
            photos_dir,
            run,
            *stage2,
            *common,
            "stages.stage2.gan_start_step=1000",
            f"stages.stage2.distill_weight={weight}",
        )
        cosine[weight] = _metric(run, "val/teacher_cosine")[-1]
    print(f"{preset} teacher-feature cosine after stage 2: distill 1 -> {cosine[1.0]:.4f}, 0 -> {cosine[0.0]:.4f}")
    # a normalised last layer (SigLIP's post-layernorm) keeps cosines high: compare the distances from 1
    assert cosine[1.0] >= 0.99 and 1 - cosine[0.0] > 10 * (1 - cosine[1.0])


class RecordShardedBlocks(L.Callback):
    """Write which of the encoder's blocks FSDP2 manages, once training starts (for the subprocess test)."""

    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FSDPModule

        blocks = pl_module.tokenizer.encoder.blocks()
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps([isinstance(block, FSDPModule) for block in blocks]))


@pytest.mark.slow  # two processes per run: DDP and FSDP2 with the encoders' frozen, unused parameters
@pytest.mark.parametrize(("preset", "strategy"), [("tiny_dinov2", "ddp"), ("tiny_siglip2", "fsdp")])
def test_stage2_in_two_processes(preset, strategy, photos_dir, tmp_path):
    """DDP runs without an unused-parameter search and FSDP2 shards per encoder block: the encoders' unused
    parameters (mask token, pooling head) must be frozen for both, and FSDP2 must find the blocks."""
    from tests.test_training_processes import PARALLEL, run_train

    common = [f"model={preset}", "data.batch_size=2", "data.train_batches_per_epoch=3"]
    stage1 = ["stage=1", "stages.stage1.max_steps=2", "stages.stage1.image_size=56"]
    run_train(photos_dir, tmp_path / "s1", *stage1, *common)
    record = tmp_path / "blocks.json"
    parallel = [f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    callback = [f"+callbacks.blocks._target_={__name__}.RecordShardedBlocks", f"+callbacks.blocks.out={record}"]
    run_train(photos_dir, tmp_path / "s2", *PARALLEL, f"init_from={tmp_path / 's1'}", *common, *parallel, *callback)
    assert json.loads(record.read_text()) == [strategy == "fsdp"] * 2  # both tiny blocks sharded under FSDP2
    first = load_file(tmp_path / "s1" / "tokenizer" / "model.safetensors")
    second = load_file(tmp_path / "s2" / "tokenizer" / "model.safetensors")
    encoder = [k for k in first if k.startswith("vision_tower.")]
    kept = [k for k in encoder if "head." in k or "mask_token" in k]
    assert kept and all(torch.equal(first[k], second[k]) for k in kept)
    assert any(not torch.equal(first[k], second[k]) for k in encoder if k not in kept)
