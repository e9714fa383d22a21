"""Generation training as `python train.py task=generate` runs it in subprocesses: DDP and FSDP2 on CPU."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]


def run_generate(data_root, runs_dir, stage, *overrides, name="mp"):
    # one thread per process: two processes x two threads on two cores wait on each other's preemption
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=generate/quickstart",
        f"stage={stage}",
        f"name={name}",
        f"paths.data_dir={data_root}",
        f"paths.runs_dir={runs_dir}",
        f"hydra.run.dir={runs_dir / name / 'generate' / f'stage{stage}'}",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "data.pin_memory=false",
        "data.batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "module.sample_steps=2",
        f"stages.stage{stage}.max_steps=2",
        "data.train_batches_per_epoch=2",
        *overrides,
    ]
    result = run_tree(command, cwd=REPO, env=env)
    assert result.returncode == 0, f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}"
    assert "transfer_batch_to_device" not in result.stderr  # the module moves its batches on purpose
    return runs_dir / name / "generate" / f"stage{stage}"


def test_ddp_stage1_then_fsdp2_stage2(photos_dir, tmp_path, tiny_config):
    from unilip.models import UniLIPTokenizer

    torch.manual_seed(0)
    UniLIPTokenizer(tiny_config).save_pretrained(tmp_path / "tokenizer")
    stage1 = run_generate(photos_dir, tmp_path, 1, "trainer=ddp", f"tokenizer_from={tmp_path / 'tokenizer'}")
    stage2 = run_generate(photos_dir, tmp_path, 2, "trainer=fsdp")  # starts from stage 1 by run name
    checkpoint = stage2 / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / ".metadata").exists()  # a sharded (DCP) checkpoint
    first, second = (load_file(run / "generator" / "model.safetensors") for run in (stage1, stage2))
    dit = [k for k in first if k.startswith("dit.")]
    assert not any(torch.equal(first[k], second[k]) for k in dit)  # FSDP2 trained the DiT (frozen in stage 1)
    assert json.loads((stage2 / "generator" / "config.json").read_text())["init_from"] == str(stage1)

    from unilip.tasks.generation.setup import load_trained_generator

    from_dcp, _ = load_trained_generator(checkpoint)  # the sharded checkpoint reads back to the same weights
    assert all(torch.equal(from_dcp.state_dict()[k], second[k]) for k in second)
