"""An export loads in the transformers its users run, not only in the one installed here.

The lowest transformers pyproject.toml declares, and the last 4.57 release (the 4.x line InternVL and SigLIP
users still run), are installed into a cache directory of their own (`pip install --no-deps --target`, with
the tokenizers / huggingface-hub / safetensors they require where ours do not fit), and a fresh process with
only that directory in front loads each exported folder with `SiglipVisionModel` / `Siglip2VisionModel` /
`Dinov2Model` / `Dinov2WithRegistersModel.from_pretrained`, as a user loads the hub's home checkpoint. Its
features must equal the tokenizer's, computed here, within the export's own tolerance. Needs the package index
on the first run; later runs reuse ~/.cache/unilip-tests/transformers-<version>.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from safetensors.torch import load_file, save_file

from tests.helpers import run_tree
from tests.test_encoder_export import HOME, _saved, _tokenizer
from tests.test_encoders import home_inputs, home_tokens_to_features
from unilip.export import main as export_main
from unilip.pretrained.base import EXPORT_RTOL

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unilip-tests"
LAST_4X = "4.57.6"  # the last 4.57 release on the package index (December 2026)


def lowest_declared(package: str) -> str:
    """The lower bound pyproject.toml gives `package` (`"transformers>=5.0"` -> "5.0.0")."""
    text = (ROOT / "pyproject.toml").read_text()
    version = re.search(rf'"{package}>=([0-9.]+)', text).group(1)
    return ".".join([*version.split("."), "0", "0"][:3])


def _read_dict(path: Path, name: str):
    """The literal assigned to `name` in a python file (transformers' dependency table), without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not found in {path}")


def _pip(target: Path, *specs: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *specs]
    done = run_tree(command, cwd=target, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, f"pip install {' '.join(specs)} failed:\n{done.stderr[-3000:]}"


def companions(target: Path) -> list[str]:
    """Requirements of the transformers in `target` that it checks when imported (tokenizers, huggingface-hub,
    safetensors, ...) and that the installed versions do not meet, e.g. 4.57's huggingface-hub<1.0."""
    package = target / "transformers"
    table = _read_dict(package / "dependency_versions_table.py", "deps")
    checked = _read_dict(package / "dependency_versions_check.py", "pkgs_to_check_at_runtime")
    specs = []
    for name in checked:
        if name == "python" or name not in table:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # optional (accelerate, tokenizers): only checked when present
        requirement = Requirement(table[name])
        if not requirement.specifier.contains(installed, prereleases=True):
            specs.append(str(requirement))
    return specs


def transformers_target(version: str) -> Path:
    """A directory holding transformers `version` and the companions it needs, installed once and cached."""
    target = CACHE / f"transformers-{version}"
    if (target / ".complete").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".transformers-{version}-", dir=CACHE))
    try:
        _pip(staging, f"transformers=={version}")
        extra = companions(staging)
        if extra:
            _pip(staging, *extra)
        (staging / ".complete").write_text(json.dumps({"transformers": version, "companions": extra}))
        shutil.rmtree(target, ignore_errors=True)  # an unfinished earlier install
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("version", [lowest_declared("transformers"), LAST_4X])
def test_an_export_loads_in_another_transformers(version, tmp_path):
    target = transformers_target(version)
    jobs, ours = [], {}
    for kind, home_class in HOME.items():
        tokenizer = _tokenizer(kind)
        folder = tmp_path / "exports" / kind
        export_main(["--tokenizer", str(_saved(tokenizer, tmp_path / "tokenizers" / kind)), "--out", str(folder)])
        for size in (224, 448):
            name = f"{kind}-{size}"
            images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
            inputs = home_inputs(kind, tokenizer.config, images)
            tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            save_file(tensors, str(tmp_path / f"{name}.inputs.safetensors"))
            flags = {k: v for k, v in inputs.items() if k not in tensors}
            jobs.append(dict(name=name, folder=str(folder), inputs=str(tmp_path / f"{name}.inputs.safetensors")))
            jobs[-1].update({"class": home_class.__name__, "flags": flags})
            with torch.no_grad():
                ours[name] = (kind, tokenizer.config, size, tokenizer.features(images))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = ROOT / "tests" / "load_with_transformers.py"
    done = run_tree([sys.executable, str(script), "jobs.json", str(tmp_path)], cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["transformers"] == version and report["file"].startswith(str(target))

    for name, (kind, config, size, expected) in ours.items():
        assert report["loads"][name] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}, name
        hidden = load_file(str(tmp_path / f"{name}.safetensors"))["last_hidden_state"]
        theirs = home_tokens_to_features(kind, config, hidden, (size, size))
        difference = (theirs - expected).abs().max().item()
        tolerance = EXPORT_RTOL * max(1.0, expected.abs().max().item())
        print(f"transformers {version}, {name}: max |diff| {difference:.2e} (tolerance {tolerance:.2e})")
        assert difference <= tolerance, f"{name}: {difference:.2e} > {tolerance:.2e}"
