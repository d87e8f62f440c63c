"""The method registry: a name -> method class table, and method configs from names, dicts or configs."""

from __future__ import annotations

from .base import EvictionMethod, MethodConfig

METHODS: dict[str, type[EvictionMethod]] = {}


def register_method(cls: type[EvictionMethod]) -> type[EvictionMethod]:
    """Register a method class under its config's name (one line per method in `trainkv.methods`)."""
    METHODS[cls.config_class.name] = cls
    return cls


def get_method(name: str) -> type[EvictionMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_config(method: str | dict | MethodConfig, **overrides) -> MethodConfig:
    """A method config from a name, a dict (with a ``method`` key) or a config object, plus overrides."""
    if isinstance(method, MethodConfig):
        data = {**method.to_dict(), **overrides}
        return type(method).from_dict(data)
    if isinstance(method, dict):
        data = {**method, **overrides}
        return get_method(data["method"]).config_class.from_dict(data)
    return get_method(method).config_class.from_dict(overrides)
