"""The README's Python examples run and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


# Examples that compile (torch.compile takes minutes on a small CPU) run with the slow tests.
PARAMS = [pytest.param(b, marks=[pytest.mark.slow] if "compile=True" in b else []) for b in BLOCKS]


@pytest.mark.parametrize("block", PARAMS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example(block, monkeypatch):
    lines = block.splitlines()
    # A comment line right after a print(...) line states that print's output.
    expected = [
        lines[i + 1].lstrip("# ")
        for i, line in enumerate(lines[:-1])
        if line.startswith("print(") and lines[i + 1].startswith("# ")
    ]
    assert expected, "each README example states its printed output"
    monkeypatch.chdir(ROOT)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert output.getvalue().splitlines() == expected
