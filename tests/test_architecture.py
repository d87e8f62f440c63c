"""The package's imports point one way (docs/architecture.md): no cycles, no import from a higher floor, no
intra-package import hidden in a function, and the runtime core loads without the evaluation or training code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from runtime_helpers import env_for_subprocess

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trainkv"


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of a trainkv module."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in dict.fromkeys(targets):
            if t in mods and t != name and not name.startswith(t + "."):
                out.append((t, node.lineno, id(node) in inside))
    return out


def floors() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Floors (machine-readable")[1].split("\n## ")[0]
    out = {}
    for floor, prefixes in re.findall(r"^\| (\d) \| (.+?) \|$", table, re.M):
        for prefix in prefixes.split(","):
            out[prefix.strip()] = int(floor)
    assert out, "no floor table in docs/architecture.md"
    return out


def floor_of(name: str, table: dict[str, int]) -> int:
    best = max((p for p in table if name == p or name.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{name} is on no floor of docs/architecture.md"
    return table[best]


def test_every_import_points_down_and_none_hides_in_a_function():
    mods, table = modules(), floors()
    up, hidden = [], []
    for name, path in mods.items():
        for target, line, in_function in imports(name, path, mods):
            if floor_of(target, table) > floor_of(name, table):
                up.append(f"{name}:{line} imports {target} (floor {floor_of(name, table)} -> {floor_of(target, table)})")
            if in_function:
                hidden.append(f"{name}:{line} imports {target} inside a function")
    assert not up, "imports pointing up:\n" + "\n".join(up)
    assert not hidden, "intra-package imports inside functions:\n" + "\n".join(hidden)


def test_no_import_cycles():
    mods = modules()
    graph = {name: {t for t, _, _ in imports(name, path, mods)} for name, path in mods.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_runtime_core_loads_without_eval_or_training():
    code = ("import sys, trainkv.cache; "
            "print(sorted(m for m in sys.modules if m.startswith(('trainkv.eval', 'trainkv.training', 'trainkv.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for_subprocess(),
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_version_is_written_once():
    from trainkv._version import __version__

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_the_floor_test_sees_a_violation(tmp_path):
    """The checker itself: an upward import and a function-level import are both found."""
    mods = {"trainkv.core": tmp_path / "core.py", "trainkv.top": tmp_path / "top.py"}
    mods["trainkv.core"].write_text("def f():\n    from trainkv import top\n")
    mods["trainkv.top"].write_text("")
    found = imports("trainkv.core", mods["trainkv.core"], mods)
    assert found == [("trainkv.top", 2, True)]
