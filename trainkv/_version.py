"""The package version, in one place (pyproject.toml repeats it; tests/test_architecture.py checks they agree)."""

__version__ = "0.1.0"
