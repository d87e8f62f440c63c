"""trainkv: teach a frozen LLM which KV-cache entries it can forget.

    import trainkv
    model = trainkv.load_model("smollm2-135m")
    trainkv.attach(model, "snapkv", trainkv.EvictionConfig(budget=128))
    out = model.generate(**inputs, max_new_tokens=64)      # chunked prefill + eviction
"""

from .attach import attach, detach, method_modules, method_state_dict
from .cache import EvictingCache, EvictingLayer
from .config import EvictionConfig
from .hub import load_gated, save_gated
from .methods import METHODS, TRAINING_FREE, get_method, make_config
from .models import ALIASES, DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

__version__ = "0.1.0"

__all__ = [
    "attach", "detach", "method_modules", "method_state_dict", "EvictingCache", "EvictingLayer", "EvictionConfig",
    "METHODS", "TRAINING_FREE", "get_method", "make_config", "ALIASES", "DEFAULT_MODEL", "load_model",
    "load_tokenizer", "resolve_model", "load_gated", "save_gated", "__version__",
]
