"""Eviction methods: one file each (config dataclass + per-layer module), registered by name."""

from __future__ import annotations

from .attention_gate import AttentionGate, AttentionGateConfig
from .base import EvictionMethod, MethodConfig, ScoreContext
from .corm import CORM, CORMConfig
from .h2o import H2O, H2OConfig
from .random_scores import RandomConfig, RandomScores
from .retaining_head import RetainingHead, RetainingHeadConfig
from .snapkv import SnapKV, SnapKVConfig
from .streaming_llm import StreamingLLM, StreamingLLMConfig
from .tova import TOVA, TOVAConfig

METHODS: dict[str, type[EvictionMethod]] = {}


def register_method(cls: type[EvictionMethod]) -> type[EvictionMethod]:
    """Register a method class under its config's name (one line per method)."""
    METHODS[cls.config_class.name] = cls
    return cls


for _cls in (StreamingLLM, H2O, SnapKV, TOVA, CORM, RandomScores, AttentionGate, RetainingHead):
    register_method(_cls)
from .layer_budget import LayerBudget, LayerBudgetConfig  # noqa: E402  (learned layer budgets; registers itself)

TRAINING_FREE = ("streaming_llm", "h2o", "snapkv", "tova", "corm", "random")


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


__all__ = [
    "METHODS", "TRAINING_FREE", "EvictionMethod", "MethodConfig", "ScoreContext", "get_method", "make_config",
    "register_method", "StreamingLLM", "StreamingLLMConfig", "H2O", "H2OConfig", "SnapKV", "SnapKVConfig",
    "TOVA", "TOVAConfig", "CORM", "CORMConfig", "RandomScores", "RandomConfig", "AttentionGate", "AttentionGateConfig",
    "RetainingHead", "RetainingHeadConfig",
]
