"""Write constraints.txt: the installed versions of unilip[dev]'s dependency closure.

Run after a green CI-equivalent run:  python .ci/freeze_constraints.py > constraints.txt
"""

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement


def closure(name: str, extras: tuple[str, ...] = ("",), seen: dict[str, str] | None = None) -> dict[str, str]:
    seen = {} if seen is None else seen
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return seen
    seen[key] = dist.version
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": extra}) for extra in extras):
            continue
        closure(requirement.name, seen=seen)
    return seen


if __name__ == "__main__":
    versions = closure("unilip", ("", "dev"))
    versions.pop("unilip")
    print('# Exact versions the test suite last passed with (CI). Install: pip install -e ".[dev]" -c constraints.txt')
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")
