"""Test-only pieces that configs can name (`_target_: tests.helpers...`) in subprocess runs."""

from __future__ import annotations

import functools
import os
import signal
import subprocess

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def run_tree(command: list, *, cwd, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` in a session of its own: on a timeout the whole
    process tree is killed (the ranks a launcher started, torchrun's workers), not just the launcher, and the
    test fails with `TimeoutExpired` instead of leaving processes behind."""
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


class KillAfterCheckpoint(L.Callback):
    """SIGKILL the process right after the checkpoint of step `step` is written: a real crash, no clean-up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning runs checkpoint callbacks last, so the checkpoint of step `self.step` exists only
        # once the next batch starts.
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class _GlobalBatches(Dataset):
    """Step s serves global batch s of a fixed image tensor; rank r takes its contiguous slice."""

    def __init__(self, images: torch.Tensor, global_batch: int, steps: int, rank: int, world_size: int):
        self.images, self.global_batch, self.steps = images, global_batch, steps
        self.local = global_batch // world_size
        self.rank = rank

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        start = (step * self.global_batch) % len(self.images) + self.rank * self.local
        index = torch.arange(start, start + self.local) % len(self.images)
        return {"image": self.images[index], "key": [str(i) for i in index.tolist()]}


class FixedGlobalBatches(L.LightningDataModule):
    """Identical global batches whatever the number of processes (for the DDP-equals-one-process test)."""

    def __init__(self, images_file: str, global_batch: int, steps: int, image_size: int = 112, **_: object):
        super().__init__()
        self.images = torch.load(images_file, weights_only=True)
        self.global_batch, self.steps, self.image_size = global_batch, steps, image_size

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        dataset = _GlobalBatches(self.images, self.global_batch, self.steps, rank, world)
        return DataLoader(dataset, batch_size=None, shuffle=False)


class StopAfter(L.Callback):
    """Ask the trainer to stop (gracefully, on every rank) once `step` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class NonFiniteGradientAt(L.Callback):
    """Make the gradient of one trainable weight NaN in the `batch`-th training batch (0-based), leaving the
    loss finite: what a sqrt at 0 or an overflow in backward does."""

    def __init__(self, batch: int):
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            handle = param.register_hook(lambda grad: (handle.remove(), grad * float("nan"))[1])
        self.seen += 1


class NonFiniteGradientFrom(L.Callback):
    """Make the gradient of one trainable weight NaN in every training batch from the `batch`-th on (0-based): a
    run that has gone bad for good, which the non-finite guard must stop."""

    def __init__(self, batch: int):
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen >= self.batch:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            handle = param.register_hook(lambda grad: (handle.remove(), grad * float("nan"))[1])
        self.seen += 1


class SignalAtStep(L.Callback):
    """Send `signal_name` to this process once `step` optimizer steps are done (as a scheduler would, from outside)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signum, self.sent = step, signal.Signals[signal_name], False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class RecordTrainingModes(L.Callback):
    """Write, for every training batch, whether each named submodule is in train mode (JSON list to `out`)."""

    def __init__(self, modules: list[str], out: str):
        self.modules, self.out, self.rows = list(modules), out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.append({name: pl_module.get_submodule(name).training for name in self.modules})

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        with open(self.out, "w") as file:
            json.dump(self.rows, file)


class GradientLayoutReport(L.Callback):
    """Under DDP, in the third step: record the strides each gradient has when autograd hands it to DDP, and
    write the DDP-managed parameters whose bucket view has other strides (JSON, rank 0)."""

    def __init__(self, out: str, skip_prefix: str = "discriminator."):
        self.out, self.skip_prefix = out, skip_prefix
        self.arrived: dict[str, tuple] = {}
        self.handles: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            for name, param in pl_module.named_parameters():
                if param.requires_grad and not name.startswith(self.skip_prefix):
                    self.handles.append(param.register_post_accumulate_grad_hook(functools.partial(self._record, name)))

    def _record(self, name: str, param: torch.Tensor) -> None:
        # the gradient as autograd leaves it, before DDP's hook reduces it into its bucket
        self.arrived.setdefault(name, tuple(param.grad.stride()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.handles:
            return
        for handle in self.handles:
            handle.remove()
        self.handles = []
        params = dict(pl_module.named_parameters())
        mismatched = {n: [s, tuple(params[n].grad.stride())] for n, s in self.arrived.items()}
        mismatched = {n: v for n, v in mismatched.items() if v[0] != v[1]}
        if trainer.is_global_zero:
            import json

            with open(self.out, "w") as file:
                json.dump({"checked": len(self.arrived), "mismatched": mismatched}, file)


class TouchAtStep(L.Callback):
    """Create the file `path` once `step` optimizer steps are done (a test waits for it before signalling)."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and trainer.is_global_zero:
            open(self.path, "a").close()


class SignalDuringStep(L.Callback):
    """Send `signal_name` to this process while step `step` (counted from 1) runs, from its batch start, as a
    scheduler would in the middle of a step: the run must stop after exactly that step. A run resumed after
    that step never sends it."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1"):
        self.step, self.signum = step, signal.Signals[signal_name]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


class KillRankInFirstAttempt(L.Callback):
    """Under torchrun: SIGKILL rank `rank` once `step` steps are done (after that step's checkpoint), in the
    first attempt only (TORCHELASTIC_RESTART_COUNT=0), as a crashed GPU or node would."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_rank == self.rank and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordOptimizerSteps(L.Callback):
    """Just before every optimizer step (after clipping): the gradient norms of the tokenizer's trainable
    parameters and of the discriminator (None without gradients), and a digest of the discriminator's
    weights. JSON list to `out` at the end of training."""

    def __init__(self, out: str):
        self.out, self.rows = out, []

    @staticmethod
    def _norm(params) -> float | None:
        grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
        return torch.cat(grads).norm().item() if grads else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        import hashlib

        discriminator = list(pl_module.discriminator.parameters()) if pl_module.discriminator is not None else []
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in discriminator)).hexdigest()
        self.rows.append(
            {
                "step": trainer.global_step,
                "generator_norm": self._norm(p for p in pl_module.tokenizer.parameters() if p.requires_grad),
                "discriminator_norm": self._norm(discriminator),
                "discriminator_digest": digest,
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        with open(self.out, "w") as file:
            json.dump(self.rows, file)


def random_inception_state(monkeypatch) -> dict[str, torch.Tensor]:
    """The weights of torch-fidelity's FID Inception, randomly initialised (seed 0): no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as patch:
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        torch.manual_seed(0)
        return inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
