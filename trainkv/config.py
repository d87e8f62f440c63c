"""Runtime eviction settings shared by every method: budget, protected tokens, chunking."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .budgets import SPELLINGS, parse_budget, ratio_entries, weighted_budgets

#: Keys that older checkpoints saved and that mean nothing now (dropped on load).
RETIRED_KEYS = ("seed",)


@dataclass
class EvictionConfig:
    """How much cache each (layer, KV head) may hold and which tokens are never evicted.

    budget: entries kept per (layer, KV head), in the budget language of `trainkv.budgets`: ``512`` entries, or a
        ratio ``0.125`` / ``"1/8"`` of the tokens seen so far (the cache then grows with the context).
    sink_tokens: the first tokens of each sequence (attention sinks), always kept.
    recent_window: the most recent tokens, always kept.
    chunk_size: prefill chunk size (tokens per forward); eviction runs after each chunk.
    evict_during_decoding: keep the budget while generating (otherwise the cache grows by one per token).
    mode: "budget" keeps the top-``budget`` by score; "threshold" keeps every entry whose score is above
        ``threshold`` (and at most ``budget`` when a budget is given).
    layer_budgets: optional per-layer budgets (absolute entries) overriding ``budget``.
    head_budgets: optional per-(layer, KV head) budgets, ``[num_layers][num_kv_heads]``.
    allocation_weights: optional relative shares ``[num_layers][num_kv_heads]`` of the total budget
        (``budget`` x layers x KV heads): per-(layer, head) budgets proportional to them, at least the
        protected tokens each, summing exactly to the total, for whatever ``budget`` is in effect (see
        `trainkv.budgets.weighted`; learned by the ``layer_budget`` method). Ignored when
        ``layer_budgets`` or ``head_budgets`` is set.
    head_allocation: ``"fixed"`` (each head keeps its own budget) or ``"adaptive"`` (Ada-KV: at each
        eviction a layer keeps the sum of its heads' budgets, split across heads by a joint top-k of the
        current scores, each head keeping at least ``adaptive_floor`` x the layer's mean head budget).
    adaptive_floor: Ada-KV's safeguard fraction alpha (kvpress default 0.2).
    """

    budget: int | float = 256
    sink_tokens: int = 4
    recent_window: int = 32
    chunk_size: int = 512
    evict_during_decoding: bool = True
    mode: str = "budget"
    threshold: float = 0.0
    layer_budgets: list[int] | None = None
    head_budgets: list[list[int]] | None = None
    allocation_weights: list[list[float]] | None = None
    head_allocation: str = "fixed"
    adaptive_floor: float = 0.2

    def __post_init__(self):
        if isinstance(self.budget, str):
            self.budget = parse_budget(self.budget)
        self.validate()

    @property
    def protected(self) -> int:
        return self.sink_tokens + self.recent_window

    def validate(self) -> None:
        if self.mode not in ("budget", "threshold"):
            raise ValueError(f"mode must be 'budget' or 'threshold', got {self.mode!r}")
        for name in ("sink_tokens", "recent_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (tokens), got {value!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold):
            raise ValueError(f"threshold must be a number (not NaN), got {self.threshold!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"budget: {self.budget!r} is not a budget; use {SPELLINGS}")
        if isinstance(self.budget, float):
            parse_budget(self.budget)  # a ratio in (0, 1], else a clear error
        elif self.budget < self.protected:
            raise ValueError(
                f"budget {self.budget} is smaller than the protected tokens (sink_tokens={self.sink_tokens} + "
                f"recent_window={self.recent_window} = {self.protected}); raise the budget or shrink the window"
            )
        for name in ("layer_budgets",):
            values = getattr(self, name)
            if values is not None and min(values) < self.protected:
                raise ValueError(f"{name} has an entry {min(values)} below the protected tokens ({self.protected})")
        if self.head_budgets is not None and min(min(r) for r in self.head_budgets) < self.protected:
            raise ValueError(f"head_budgets has an entry below the protected tokens ({self.protected})")
        if self.head_allocation not in ("fixed", "adaptive"):
            raise ValueError(f"head_allocation must be 'fixed' or 'adaptive', got {self.head_allocation!r}")
        if self.head_allocation == "adaptive" and self.mode != "budget":
            raise ValueError("head_allocation='adaptive' (Ada-KV) needs mode='budget'")
        if not 0.0 <= self.adaptive_floor <= 1.0:
            raise ValueError(f"adaptive_floor must lie in [0, 1], got {self.adaptive_floor}")
        if self.allocation_weights is not None:
            flat = [float(w) for row in self.allocation_weights for w in row]
            if not flat or not all(math.isfinite(w) and w >= 0 for w in flat) or sum(flat) <= 0:
                raise ValueError("allocation_weights must be finite, >= 0 and not all zero")

    def budget_for(self, layer_idx: int, num_kv_heads: int, tokens_seen: int, horizon: int | None = None) -> list[int]:
        """Budget of each KV head of a layer once ``tokens_seen`` tokens were seen.

        ``horizon``: the most tokens the cache will see (prompt + new tokens), when the caller knows it. Learned
        ``allocation_weights`` then give no head more entries than that (it could never fill them) and hand the
        rest to the other heads, so the whole budget is used; without it a layer whose share exceeds the context
        leaves the excess empty."""
        if self.head_budgets is not None:
            row = self.head_budgets[layer_idx]
            if len(row) != num_kv_heads:
                raise ValueError(f"head_budgets[{layer_idx}] has {len(row)} entries, the model has {num_kv_heads} KV heads")
            return list(row)
        if self.layer_budgets is not None:
            return [self.layer_budgets[layer_idx]] * num_kv_heads
        if self.allocation_weights is not None:
            per_head = self.budget if isinstance(self.budget, int) else ratio_entries(self.budget, tokens_seen, self.protected)
            cap = None if horizon is None else max(int(horizon), per_head)  # max: a total the heads can always hold
            row = weighted_budgets(self.allocation_weights, per_head, self.protected, cap)[layer_idx]
            if len(row) != num_kv_heads:
                raise ValueError(f"allocation_weights[{layer_idx}] has {len(row)} entries, the model has {num_kv_heads} KV heads")
            return list(row)
        if isinstance(self.budget, float):
            return [ratio_entries(self.budget, tokens_seen, self.protected)] * num_kv_heads
        return [self.budget] * num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvictionConfig":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown eviction settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "EvictionConfig":
        data = self.to_dict()
        data.update(changes)
        return EvictionConfig.from_dict(data)

    def merged(self, eviction: "EvictionConfig | dict | None" = None, **overrides) -> "EvictionConfig":
        """These settings changed by ``eviction`` (an `EvictionConfig` replaces them, a dict overrides some fields,
        None keeps them), then by ``overrides``: the one rule every entry point uses."""
        if isinstance(eviction, EvictionConfig):
            out = eviction
        elif isinstance(eviction, dict):
            out = self.replace(**eviction)
        elif eviction is None:
            out = self
        else:
            raise TypeError(f"eviction must be an EvictionConfig, a dict of its fields or None, got {type(eviction).__name__}")
        return out.replace(**overrides) if overrides else out

