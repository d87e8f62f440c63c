"""trainkv: teach a frozen LLM which KV-cache entries it can forget.

    import trainkv
    model = trainkv.load_model("smollm2-135m")
    trainkv.attach(model, "snapkv", trainkv.EvictionConfig(budget=128))
    out = model.generate(**inputs, max_new_tokens=64)      # chunked prefill + eviction

The package's floors (each imports only from the floors below it; docs/architecture.md):
runtime core (budgets, config, cache, models) -> methods -> hub files -> attention, attach -> load_gated
-> training, eval -> cli.
"""

from ._version import __version__
from .attach import attach, detach
from .cache import EvictingCache, EvictingLayer
from .config import EvictionConfig
from .hub.load import load_gated
from .hub.save import save_gated
from .methods import METHODS, TRAINING_FREE, get_method, make_config, method_modules, method_state_dict
from .models import ALIASES, DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

__all__ = [
    "attach", "detach", "method_modules", "method_state_dict", "EvictingCache", "EvictingLayer", "EvictionConfig",
    "METHODS", "TRAINING_FREE", "get_method", "make_config", "ALIASES", "DEFAULT_MODEL", "load_model",
    "load_tokenizer", "resolve_model", "load_gated", "save_gated", "__version__",
]
