"""Where the files trainkv ships beside its code live: the shipped checkpoints and the recipe configs.

In a source checkout (``pip install -e .``) they are the checkout's ``checkpoints/`` and ``configs/``; a wheel
installs them as data files under ``<prefix>/share/trainkv/`` (``pyproject.toml``, ``[tool.setuptools.data-files]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(sys.prefix) / "share" / "trainkv"


def data_roots() -> list[Path]:
    """Folders holding ``checkpoints/`` and ``configs/``, in order: the source checkout, then the installed data."""
    roots = [SOURCE_ROOT, DATA_ROOT]
    return [r for i, r in enumerate(roots) if r not in roots[:i]]


def find_resource(relative: str) -> Path:
    """The first ``<root>/<relative>`` that exists; a clear error naming every place looked at otherwise."""
    for root in data_roots():
        path = root / relative
        if path.exists():
            return path
    looked = ", ".join(str(r / relative) for r in data_roots())
    raise FileNotFoundError(f"{relative} is not installed (looked at {looked}); reinstall trainkv")


__all__ = ["DATA_ROOT", "SOURCE_ROOT", "data_roots", "find_resource"]
