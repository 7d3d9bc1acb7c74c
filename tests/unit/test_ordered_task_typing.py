"""Type hints survive ``@qt.task``: mypy flags ``charge.delay(account_id="x")`` like a
direct call (ParamSpec). Runs mypy --strict on tests/typing/ordered_task_cases.py."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

CASES = ROOT / "tests" / "typing" / "ordered_task_cases.py"


def test_mypy_flags_wrong_calls_of_ordered_tasks_and_keeps_their_types() -> None:
    expected = {
        (number, match.group(1))
        for number, line in enumerate(CASES.read_text().splitlines(), start=1)
        if (match := re.search(r"# E: ([a-z-]+)$", line))
    }
    assert len(expected) == 7
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--hide-error-context", str(CASES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = {
        (int(match.group(1)), match.group(2))
        for match in re.finditer(r"ordered_task_cases\.py:(\d+): error: .*\[([a-z-]+)\]$", out, re.M)
    }
    assert found == expected, out
