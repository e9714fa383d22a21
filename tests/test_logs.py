"""The command-line tools' two streams: results on stdout (`unilip.logs.output`), diagnostics on stderr."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

from unilip.logs import output


def test_results_reach_the_stdout_of_the_moment_they_are_written(monkeypatch):
    """A logger set up before a redirection (a test's capture, a wrapper's) still writes where stdout is now."""
    results = output("tests.logs.redirect")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    results.info("one")
    monkeypatch.setattr(sys, "stdout", second)
    results.info("two %d", 2)
    assert (first.getvalue(), second.getvalue()) == ("one\n", "two 2\n")
    assert output("tests.logs.redirect") is results and len(results.handlers) == 1  # one handler, not one per call


def test_a_library_caller_silences_results_like_any_logger(monkeypatch):
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stdout", captured)
    results = output("tests.logs.silenced")
    logging.getLogger("tests.logs.silenced.output").setLevel(logging.WARNING)
    results.info("not wanted")
    assert captured.getvalue() == ""


def test_a_tool_prints_its_result_alone_on_stdout_and_its_progress_on_stderr():
    """`tool > result` must hold the result only: the bare message, no level or logger name."""
    code = (
        "import logging; from unilip.logs import cli_logging, output\n"
        "cli_logging()\n"
        "logging.getLogger('unilip.progress').info('working')\n"
        "output('unilip.tool').info('{\"scale\": 1.5}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout == '{"scale": 1.5}\n'
    assert done.stderr == "INFO unilip.progress: working\n"
