"""Eviction methods: one file each (config dataclass + per-layer module), registered by name below.

A new method = one new file in this folder + one entry in the registration line below (docs/architecture.md).
"""

from __future__ import annotations

from .attention_gate import AttentionGate, AttentionGateConfig
from .base import METHOD_ATTR, EvictionMethod, MethodConfig, ScoreContext, method_modules, method_state_dict
from .corm import CORM, CORMConfig
from .h2o import H2O, H2OConfig
from .layer_budget import LayerBudget, LayerBudgetConfig
from .random_scores import RandomConfig, RandomScores
from .registry import METHODS, get_method, make_config, register_method
from .retaining_head import RetainingHead, RetainingHeadConfig
from .snapkv import SnapKV, SnapKVConfig
from .streaming_llm import StreamingLLM, StreamingLLMConfig
from .tova import TOVA, TOVAConfig

for _cls in (StreamingLLM, H2O, SnapKV, TOVA, CORM, RandomScores, AttentionGate, RetainingHead, LayerBudget):
    register_method(_cls)

TRAINING_FREE = ("streaming_llm", "h2o", "snapkv", "tova", "corm", "random")

__all__ = [
    "METHODS", "METHOD_ATTR", "TRAINING_FREE", "EvictionMethod", "MethodConfig", "ScoreContext", "get_method",
    "make_config", "method_modules", "method_state_dict", "register_method", "StreamingLLM", "StreamingLLMConfig",
    "H2O", "H2OConfig", "SnapKV", "SnapKVConfig", "TOVA", "TOVAConfig", "CORM", "CORMConfig", "RandomScores",
    "RandomConfig", "AttentionGate", "AttentionGateConfig", "RetainingHead", "RetainingHeadConfig", "LayerBudget",
    "LayerBudgetConfig",
]
