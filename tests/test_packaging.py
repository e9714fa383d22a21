"""pyproject.toml's lower bounds are the versions `.ci/lower_bounds.txt` pins (and was tested with)."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def test_every_dependency_has_a_lower_bound_pinned_in_the_lower_bounds_file():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["dev"] + extras["demo"]
    bounds = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9a-z.]*)", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: give every dependency a lower bound (name>=version)"
        bounds[match[1]] = match[2]
    pins = _pins(REPO / ".ci" / "lower_bounds.txt")
    assert bounds.keys() == pins.keys()
    for name, bound in bounds.items():
        assert pins[name].startswith(bound), f"{name}: pyproject says >={bound}, lower_bounds.txt pins {pins[name]}"


def test_constraints_pin_every_direct_dependency():
    pins = {name.lower(): version for name, version in _pins(REPO / "constraints.txt").items()}
    assert {"torch", "lightning", "transformers", "diffusers", "webdataset", "hydra-core"} <= pins.keys()


def test_every_package_and_config_ships_in_the_wheel():
    """pyproject lists the packages explicitly (conf/ is mapped into unilip/conf): none may be forgotten."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "unilip").rglob("__init__.py")}
    assert set(tool["packages"]) == on_disk | {"unilip.conf"}
    assert tool["package-dir"] == {"unilip.conf": "conf"} and tool["package-data"] == {"unilip.conf": ["**/*.yaml"]}
    assert not [p for p in (REPO / "conf").rglob("*") if p.is_file() and p.suffix != ".yaml"]  # all are *.yaml
