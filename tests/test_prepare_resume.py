"""A `prepare` killed mid-run (SIGKILL to the whole process tree, as a cluster kills a job) and started again
ends with the same files, byte for byte, as a run that was never interrupted; at no moment is a shard
half-written under its name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import prepare_miniatures as mini
from tests.helpers import run_tree
from unilip.data.prepare.datasets import prepare

REPO = Path(__file__).resolve().parents[1]
SHARDS = 24
ARGS = ["--samples-per-shard", "2", "--workers", "2"]


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an out folder but the progress log (its lines are in the order jobs finished)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith("-progress.jsonl")}


def test_a_killed_run_started_again_ends_with_the_same_shards(tmp_path):
    # 256 x 256 noise images: a few ms of decoding per image, so that the run is still going when killed
    mini.gpt_image_edit_download(tmp_path / "dl", records=SHARDS, size=(256, 256))
    reference = prepare("gpt-image-edit", tmp_path / "dl", tmp_path / "reference", workers=2, samples_per_shard=2)
    assert len(reference["shards"]) == SHARDS  # 2 x 24 good records, 2 per shard; a 25th job has only bad ones

    out = tmp_path / "out"
    command = [sys.executable, "-m", "unilip.data.prepare", "gpt-image-edit", str(tmp_path / "dl"), str(out), *ARGS]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.tar")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed = _files(out)
    written = [name for name in killed if name.endswith(".tar")]
    assert 1 <= len(written) < len(reference["shards"]), "the kill must land mid-run"
    assert "index.json" not in killed and "shard-report.json" not in killed  # the books say: not finished
    for name in written:  # renamed into place only when complete
        assert killed[name] == (tmp_path / "reference" / name).read_bytes()

    result = run_tree(command, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(out) == _files(tmp_path / "reference")  # shards, index.json, report: byte for byte
    assert not list(out.glob("*.tmp"))
