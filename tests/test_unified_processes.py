"""The unified task under DDP, as `python train.py task=unified trainer=ddp` runs it: two CPU processes (gloo),
each with its own images and rollouts; the adapters stay identical on both ranks, step after step."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests import sampling_helpers

REPO = Path(__file__).resolve().parents[1]


class SaveTrainedPerRank(L.Callback):
    """Every rank writes its trained parameters at the end of fit (`rank<r>.pt` in `directory`)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.trained.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow  # two CLI starts of two processes each: minutes on two shared cores
def test_ddp_keeps_the_adapters_of_both_ranks_identical(photos_dir, tmp_path, tiny_config):
    generator = sampling_helpers.save_tiny_generator(tmp_path / "tiny", tiny_config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    for stage in (1, 2):
        run_dir = tmp_path / "runs" / "ddp" / "unified" / f"stage{stage}"
        command = [
            sys.executable, str(REPO / "train.py"), "task=unified", "experiment=unified/quickstart", f"stage={stage}",
            "name=ddp", f"paths.data_dir={photos_dir}", f"paths.runs_dir={tmp_path / 'runs'}",
            f"hydra.run.dir={run_dir}", f"generator_from={generator}", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
            "data.num_workers=0", "data.val_num_workers=0", "data.pin_memory=false", "data.val_batch_size=2",
            f"stages.stage{stage}.max_steps=2", "data.train_batches_per_epoch=2", "module.group_size=2",
            "captioner.max_new_tokens=4", "module.rendering.steps=1", "module.sampling.steps=2",
            "+callbacks.ranks._target_=tests.test_unified_processes.SaveTrainedPerRank",
            f"+callbacks.ranks.directory={tmp_path / f'ranks{stage}'}",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"stage {stage} failed:\n{result.stderr[-4000:]}"
        first, second = (torch.load(tmp_path / f"ranks{stage}" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), stage
        assert (run_dir / ("captioner" if stage == 1 else "generator")).is_dir()
