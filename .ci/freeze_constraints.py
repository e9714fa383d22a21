"""Write constraints.txt: the installed versions of unilip[dev,demo]'s dependency closure.

Run after a green CI-equivalent run:  python .ci/freeze_constraints.py > constraints.txt
"""

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement


def closure(name: str, extras: tuple[str, ...] = ("",), seen: dict[str, str] | None = None, visited=None) -> dict:
    """name -> version for `name` and everything it requires, following requested extras
    (e.g. torch's `cuda-toolkit[cublas,...]`) as well as plain requirements."""
    seen = {} if seen is None else seen
    visited = set() if visited is None else visited
    key = re.sub(r"[-_.]+", "-", name).lower()
    todo = tuple(extra for extra in extras if (key, extra) not in visited)
    if not todo:
        return seen
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return seen
    visited.update((key, extra) for extra in todo)
    seen[key] = dist.version
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": extra}) for extra in todo):
            continue
        closure(requirement.name, ("", *sorted(requirement.extras)), seen, visited)
    return seen


if __name__ == "__main__":
    versions = closure("unilip", ("", "dev", "demo"))
    versions.pop("unilip")
    install = 'pip install -e ".[dev,demo]" -c constraints.txt'
    print(f"# Exact versions the test suite last passed with (CI). Install: {install}")
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")
