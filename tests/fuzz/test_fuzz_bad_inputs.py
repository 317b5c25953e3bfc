"""Bad-input table (issue 14): each case in its own child process (``fuzz_bad_table``).

A case passes when the call raises a TypeError/ValueError/NotImplementedError naming the offending
argument, or (empty shapes, NaN rows) returns what the contract says, and every input tensor is
bitwise unchanged; a crash, hang or missing report fails. Cases today's code gets wrong are marked
``xfail(strict=True)`` with the defect (``KNOWN``), so each flips to a failure when it is fixed and
the mark must go.

The default tier runs every third case; ``-m slow`` runs the whole table.
"""

from __future__ import annotations

import pytest
from fuzz_bad_table import CASES, run_in_child, verdict

# Cases that fail today: name -> the defect (file:function, what happens).
KNOWN: dict[str, str] = {}


def _params(selected):
    out = []
    for name in selected:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[name])] if name in KNOWN else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


NAMES = list(CASES)
FAST = NAMES[::3]


def _run(name):
    report = run_in_child(name)
    problems = verdict(CASES[name], report)
    assert not problems, f"{name}: " + "; ".join(problems) + f"\nreport: {report}"


@pytest.mark.parametrize("name", _params(FAST))
def test_bad_input(name):
    _run(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _params([n for n in NAMES if n not in FAST]))
def test_bad_input_slow(name):
    _run(name)
