"""The official scorers, each pinned to one upstream commit, and the check that a checkout is that scorer.

Every benchmark is scored by its maintainers' own code at a named commit (`Pin`, recorded in the manifest and
in results.json). Before anything is generated, `check_checkout` looks at the checkout `scorer=` names: the
pinned files are there, and every script the harness will run defines each option it will be passed. The
options are read from the scripts' `add_argument` calls in their source (statically: the scorer's own
environment, its detector or judge client, need not import here). A checkout that fails is refused in one line
that names the pinned commit and how to get it; one at another commit that passes is used, with a warning, and
its commit is recorded beside the pinned one.
"""

from __future__ import annotations

import ast
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unilip.errors import UserError

log = logging.getLogger(__name__)


class ScorerError(UserError):
    """The scorer given is not the pinned one, or one of its steps failed (the message names the step and log)."""


@dataclass(frozen=True)
class Pin:
    """An official scorer at one upstream commit.

    Attributes:
        repository: `owner/name` on GitHub.
        commit: the full commit hash the harness's commands are written for.
        files: paths (relative to the checkout's root) the harness runs or its commands read.
    """

    repository: str
    commit: str
    files: tuple[str, ...]

    @property
    def folder(self) -> str:
        return self.repository.split("/")[1]

    def clone(self) -> str:
        """The command that makes the pinned checkout."""
        return f"git clone https://github.com/{self.repository} && git -C {self.folder} checkout {self.commit}"

    def record(self) -> dict[str, str]:
        return {"repository": self.repository, "commit": self.commit, "clone": self.clone()}


def defined_options(script: Path) -> set[str]:
    """Every argument name a script's argparse calls define (`--flag`, `-f`, positional names), read statically."""
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def checkout_commit(scorer: str | Path | None) -> str | None:
    """The git commit of a checkout, if it is one."""
    if not scorer:
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(scorer), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def check_checkout(pin: Pin, scorer: str, steps: Sequence, python: str) -> str | None:
    """Refuse (ScorerError, one line) a checkout that is not `pin`'s scorer for these steps; returns its commit.

    `steps` are the benchmark's `ScoreStep`s for this checkout: each runs `argv[1]` (a script, relative to its
    `cwd`) with the options among `argv[2:]` (the words starting with "-").
    """
    where = f"{pin.repository} at {pin.commit[:7]}"
    fix = f"get the pinned scorer with: {pin.clone()}"
    root = Path(scorer).expanduser()
    if not root.is_dir():
        raise ScorerError(f"scorer={scorer} is not a folder; give a checkout of {where} ({fix})")
    missing = [name for name in pin.files if not (root / name).is_file()]
    if missing:
        raise ScorerError(f"scorer={scorer} is not {where}: it has no {missing[0]}; {fix}")
    for step in steps:
        script = Path(step.cwd) / step.argv[1]
        try:
            defined = defined_options(script)
        except (OSError, SyntaxError, UnicodeDecodeError) as error:
            raise ScorerError(f"scorer={scorer}: {script} cannot be read as Python ({error}); {fix}") from None
        passed = [word for word in step.argv[2:] if word.startswith("-")]
        unknown = [option for option in passed if option not in defined]
        if unknown:
            raise ScorerError(
                f"scorer={scorer} is not {where}: {step.argv[1]} takes no {', '.join(unknown)} (the harness passes "
                f"{' '.join(passed)}); {fix}"
            )
    if shutil.which(python) is None:
        raise ScorerError(f"scorer_python={python} is not an interpreter on PATH; give the scorer environment's python")
    commit = checkout_commit(root)
    if commit != pin.commit:
        log.warning(
            "scorer %s is at %s, not the pinned %s %s; its files and arguments match, so it is used (%s)",
            scorer,
            commit or "an unknown commit",
            pin.repository,
            pin.commit,
            pin.clone(),
        )
    return commit
