"""The README's example runs as written, and its first lines give the two commands."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_first_lines_give_two_commands():
    head = README.read_text().splitlines()[:6]
    commands = [line for line in head if line.startswith("pip install")]
    assert len(commands) == 2
    assert any("pytest" in line for line in commands)
