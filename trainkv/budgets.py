"""Budgets: how many KV entries each (layer, KV head) keeps, in one language, and how one total is split.

Spellings (the same wherever a budget is given: ``generate(eviction={"budget": ...})``, ``load_gated(budget=...)``,
YAML ``eviction.budget``, ``trainkv generate --budget``, ``trainkv eval --keep``; `parse_budget`):

* ``512`` (an int, or text of digits): 512 entries per (layer, KV head);
* ``0.125`` or ``1/8`` (a float or a fraction in (0, 1]): a ratio. At run time (``EvictionConfig.budget``) it is a
  ratio of the *tokens seen so far* (the budget grows with the context); in ``trainkv eval --keep`` it is a ratio
  of the run's *nominal context length*, fixed as ``round(r * context_length)`` entries for every sample of the
  run (`keep_entries`), which is why the evaluation calls it "keep" and not "budget".

Allocators split one total budget over layers and KV heads. Every allocator returns integer budgets
``[num_layers][num_kv_heads]`` that sum exactly to ``total_per_head * num_layers * num_kv_heads`` and are each
at least ``floor`` (the protected sink + recent-window tokens, which count inside the budget):

* ``uniform``: every (layer, head) gets ``total_per_head``.
* ``pyramid``: PyramidKV's linear decay over layers (Cai et al., arXiv 2406.02069; kvpress
  ``PyramidKVPress``): with ``base = total_per_head - floor`` evictable entries per head,
  ``k_min = base / beta``, ``k_max = 2 base - k_min``, layer ``l`` gets ``floor + k_max - l (k_max - k_min) / (L - 1)``
  (beta = 20), the same for every head of the layer. kvpress falls back to uniform when
  ``k_min < window`` (it always would at our budgets); this follows the original KVCache-Factory code,
  which has no such fallback.
* ``xkv``: XKV's greedy marginal allocation (Li et al., arXiv 2412.05896, ``xkv_utils.py``) from a
  `ScoreProfile` (measured by `trainkv.eval.allocation.profile_scores`): per sample, the gain of a layer's k-th
  slot is ``sum over heads of the k-th largest score / the layer's total score``; the greedy (= exact optimum of
  this separable concave problem) gives each layer its count of slots, one budget per layer shared by its heads;
  allocations are averaged over the profiled samples and rounded (XKV's per-task amortisation).
* ``adakv``: Ada-KV (Feng et al., arXiv 2407.11550; kvpress ``AdaKVPress``). Dynamic: the fixed budgets
  are uniform (the layer totals), and ``EvictionConfig(head_allocation="adaptive")`` makes the runtime
  split each layer's total across its heads at every eviction by a joint top-k of the current scores,
  each head first keeping its top ``adaptive_floor * total / H`` (the safeguard, alpha = 0.2) and its
  protected tokens (`adaptive_head_counts`, called from trainkv's attention function).
* ``weighted``: proportional to given weights with floors (water-filling), e.g. the keep fractions the
  ``layer_budget`` method learned; `EvictionConfig.allocation_weights` applies it at any budget.

Memory. The cache stores a layer as ``[B, H, max_h kept, D]``: heads holding fewer entries than the
layer's largest are padded (validity mask). Per-*layer* allocations (uniform, pyramid, xkv) therefore
change the bytes exactly as the budgets; per-*head* allocations inside a layer (adakv, weighted with
per-head weights) change which entries are kept but a layer's bytes follow its largest head
(`layer_bytes`). Report both kept entries and bytes.

This module is the runtime's ground floor: it imports nothing from trainkv.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Sequence

import torch

ALLOCATORS = ("uniform", "pyramid", "xkv", "adakv", "weighted")
PYRAMID_BETA = 20.0


# ---------------------------------------------------------------------------------------------------------
# spellings
# ---------------------------------------------------------------------------------------------------------
SPELLINGS = "entries per (layer, KV head) like 512, or a ratio in (0, 1] like 0.125 or 1/8"


def parse_budget(value: str | int | float, what: str = "budget") -> int | float:
    """The one budget language: ``512`` / ``"512"`` -> 512 entries (int); ``0.125`` / ``"0.125"`` / ``"1/8"`` ->
    ratio 0.125 (float in (0, 1]). Anything else raises a ValueError naming ``what``, the value and the spellings."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{what}: {value!r} is not a budget; use {SPELLINGS}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if re.fullmatch(r"[+-]?\d+", text):
                value = int(text)
            elif re.fullmatch(r"\s*\d+\s*/\s*\d+\s*", text):
                value = float(Fraction(text.replace(" ", "")))
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{what}: {value!r} is not a budget; use {SPELLINGS}") from None
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and value > 1:
            return int(value)
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError(f"{what}: {value!r} is not a budget: a ratio must lie in (0, 1]; use {SPELLINGS}")
        return value
    if value < 1:
        raise ValueError(f"{what}: {value!r} is not a budget: at least 1 entry; use {SPELLINGS}")
    return int(value)


def keep_entries(keep: int | float, context_length: int) -> int:
    """Entries per (layer, KV head) of an evaluation's ``keep``: ``round(r * context_length)`` for a ratio (of the
    nominal context), the int otherwise."""
    if isinstance(keep, float):
        return max(1, int(round(keep * context_length)))
    return int(keep)


def ratio_entries(ratio: float, tokens_seen: int, protected: int) -> int:
    """Entries per (layer, KV head) of a run-time ratio budget once ``tokens_seen`` tokens were seen."""
    return max(protected, math.ceil(ratio * tokens_seen))


# ---------------------------------------------------------------------------------------------------------
# integer rounding with floors
# ---------------------------------------------------------------------------------------------------------
def round_to_total(values: Sequence[float], total: int, floor: int = 0, cap: int | None = None) -> list[int]:
    """Integers close to ``values`` (largest remainder) summing exactly to ``total``, each in [floor, cap].

    ``values`` should already lie in [floor, cap] and sum to ``total`` (up to float error); the result
    then differs from each value by less than one.
    """
    n = len(values)
    if n == 0:
        if total:
            raise ValueError("no slots to allocate a non-zero total to")
        return []
    hi = cap if cap is not None else total
    if floor * n > total or (cap is not None and cap * n < total):
        raise ValueError(f"cannot split {total} over {n} slots with floor {floor} and cap {cap}")
    clipped = [min(max(float(v), floor), hi) for v in values]
    out = [int(math.floor(v)) for v in clipped]
    rest = total - sum(out)
    frac = sorted(range(n), key=lambda i: (-(clipped[i] - out[i]), i))
    while rest != 0:  # adjust one unit at a time, best remainders first, keeping floors and caps
        step = 1 if rest > 0 else -1
        order = frac if step > 0 else frac[::-1]
        moved = False
        for i in order:
            if rest == 0:
                break
            if floor <= out[i] + step <= hi:
                out[i] += step
                rest -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot round to {total} within floor {floor} and cap {cap}")
    return out


def water_fill(weights: Sequence[float], total: float, floor: float = 0.0, cap: float | None = None) -> list[float]:
    """Real shares ``clip(lam * w_i, floor, cap)`` summing to ``total`` (``lam`` found by bisection): proportional
    to ``weights`` except where a share is pinned at the floor or the cap. All-zero weights: equal shares."""
    n = len(weights)
    w = [max(0.0, float(x)) for x in weights]
    hi_cap = math.inf if cap is None else float(cap)
    if n * floor > total + 1e-9 or n * hi_cap < total - 1e-9:
        raise ValueError(f"cannot split {total} over {n} slots with floor {floor} and cap {cap}")
    if sum(w) <= 0:
        return [float(total) / n] * n

    def shares(lam: float) -> list[float]:
        return [min(max(lam * x, floor), hi_cap) for x in w]

    most = sum(hi_cap if x > 0 else floor for x in w)
    if most < total:  # the positive-weight slots are all capped: the zero-weight ones take the rest equally
        zeros = [i for i in range(n) if w[i] == 0]
        extra = (total - most) / len(zeros)
        return [hi_cap if w[i] > 0 else floor + extra for i in range(n)]
    lo, hi = 0.0, 1.0
    while sum(shares(hi)) < total:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(shares(mid)) < total:
            lo = mid
        else:
            hi = mid
    out = shares(hi)
    # remove the bisection's float residue from the unpinned slots
    residue = sum(out) - total
    free = [i for i in range(n) if floor < out[i] < hi_cap]
    for i in free:
        out[i] -= residue / len(free)
    return out


# ---------------------------------------------------------------------------------------------------------
# the allocators
# ---------------------------------------------------------------------------------------------------------
def _check(total_per_head: int, floor: int) -> None:
    if isinstance(total_per_head, bool) or not isinstance(total_per_head, int) or total_per_head <= 0:
        raise ValueError(f"total_per_head must be a positive integer (entries per head on average), got {total_per_head!r}")
    if floor > total_per_head:
        raise ValueError(f"the floor ({floor} protected entries) exceeds the mean budget per head ({total_per_head})")


def uniform(total_per_head: int, num_layers: int, num_kv_heads: int, floor: int = 0) -> list[list[int]]:
    _check(total_per_head, floor)
    return [[total_per_head] * num_kv_heads for _ in range(num_layers)]


def pyramid(total_per_head: int, num_layers: int, num_kv_heads: int, floor: int = 0, beta: float = PYRAMID_BETA,
            cap: int | None = None) -> list[list[int]]:
    """PyramidKV: per-layer budgets decaying linearly with depth, largest at layer 0 (module doc)."""
    _check(total_per_head, floor)
    if beta < 1:
        raise ValueError(f"pyramid beta must be >= 1, got {beta}")
    base = total_per_head - floor
    if num_layers == 1 or base <= 0:
        return uniform(total_per_head, num_layers, num_kv_heads, floor)
    k_min = base / beta
    k_max = 2 * base - k_min
    if cap is not None and floor + k_max > cap:  # original code: clip the top to the context, lift the bottom
        k_max = cap - floor
        k_min = 2 * base - k_max
    step = (k_max - k_min) / (num_layers - 1)
    per_layer = round_to_total([floor + k_max - i * step for i in range(num_layers)], total_per_head * num_layers,
                               floor, cap)
    return [[b] * num_kv_heads for b in per_layer]


def weighted(weights: Sequence[Sequence[float]], total_per_head: int, floor: int = 0, cap: int | None = None) -> list[list[int]]:
    """Budgets proportional to ``weights`` ``[L][H]``, at least ``floor`` each, summing to the total."""
    _check(total_per_head, floor)
    num_layers, num_kv_heads = len(weights), len(weights[0])
    if any(len(row) != num_kv_heads for row in weights):
        raise ValueError("weights must be a rectangular [num_layers][num_kv_heads] table")
    flat = [float(w) for row in weights for w in row]
    total = total_per_head * len(flat)
    shares = water_fill(flat, total, floor, cap)
    ints = round_to_total(shares, total, floor, cap)
    return [ints[i * num_kv_heads:(i + 1) * num_kv_heads] for i in range(num_layers)]


@lru_cache(maxsize=256)
def _weighted_cached(weights: tuple, total_per_head: int, floor: int, cap: int | None) -> tuple:
    return tuple(tuple(row) for row in weighted(weights, total_per_head, floor, cap))


def weighted_budgets(weights: Sequence[Sequence[float]], total_per_head: int, floor: int,
                     cap: int | None = None) -> tuple:
    """`weighted` with a cache (the runtime asks once per layer and forward)."""
    return _weighted_cached(tuple(tuple(float(w) for w in row) for row in weights), int(total_per_head), int(floor),
                            None if cap is None else int(cap))


def greedy_counts(gains: Sequence[torch.Tensor], slots: int) -> list[int]:
    """XKV's greedy: ``slots`` unit increments, each to the layer whose next gain is largest.

    ``gains[l]`` holds layer l's non-increasing marginal gains. Equal to taking the global top-``slots``
    gains (ties: lower layer first). Slots beyond every layer's length are spread evenly.
    """
    num_layers = len(gains)
    counts = [0] * num_layers
    flat = torch.cat([g.float().reshape(-1) for g in gains]) if gains else torch.zeros(0)
    owner = torch.cat([torch.full((g.numel(),), i, dtype=torch.long) for i, g in enumerate(gains)]) if gains else \
        torch.zeros(0, dtype=torch.long)
    take = min(slots, flat.numel())
    if take > 0:
        # stable order: by gain descending, then layer ascending, then rank ascending
        order = torch.argsort(-flat, stable=True)[:take]
        for i in owner[order].tolist():
            counts[i] += 1
    rest = slots - take
    for i in range(rest):
        counts[i % num_layers] += 1
    return counts


# ---------------------------------------------------------------------------------------------------------
# score profiles (measured by trainkv.eval.allocation.profile_scores)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScoreProfile:
    """Per sample and layer, XKV's marginal gains: ``layer_gains[s][l]`` ``[n]`` = for k = 1..n, the sum over
    heads of the k-th largest importance of the layer, divided by the layer's total (non-increasing).
    ``head_sorted[s][l]`` ``[H, n]`` keeps the per-head sorted importances (for analysis)."""

    layer_gains: list[list[torch.Tensor]]
    head_sorted: list[list[torch.Tensor]] = field(default_factory=list)
    method: str = ""
    transform: str = ""
    context_tokens: list[int] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layer_gains[0]) if self.layer_gains else 0

    def retained(self, budgets: Sequence[Sequence[int]], floor: int = 0) -> float:
        """Mean over samples and layers of the importance fraction the evictable part of ``budgets`` keeps
        (XKV's "retained-importance ratio"; per-layer budgets: the first head's)."""
        vals = []
        for sample in self.head_sorted:
            for l, sorted_h in enumerate(sample):
                tot = float(sorted_h.sum())
                kept = sum(float(sorted_h[h, :max(0, budgets[l][h] - floor)].sum()) for h in range(sorted_h.shape[0]))
                vals.append(kept / tot if tot > 0 else 1.0)
        return sum(vals) / max(1, len(vals))


def xkv(profile: "ScoreProfile", total_per_head: int, num_layers: int, num_kv_heads: int, floor: int = 0) -> list[list[int]]:
    """XKV: per-sample greedy over the layers' normalised sorted-score gains, averaged, rounded (module doc)."""
    _check(total_per_head, floor)
    if profile.num_layers != num_layers:
        raise ValueError(f"the score profile has {profile.num_layers} layers, the model {num_layers}")
    slots = num_layers * (total_per_head - floor)  # evictable slots, one slot = one entry in every head of a layer
    per_sample = [greedy_counts(sample, slots) for sample in profile.layer_gains]
    mean = [sum(c[l] for c in per_sample) / len(per_sample) for l in range(num_layers)]
    per_layer = round_to_total([floor + m for m in mean], total_per_head * num_layers, floor)
    return [[b] * num_kv_heads for b in per_layer]


def allocate(name: str, total_per_head: int, num_layers: int, num_kv_heads: int, scores: "ScoreProfile | None" = None,
             floor: int = 0, weights: Sequence[Sequence[float]] | None = None, beta: float = PYRAMID_BETA,
             cap: int | None = None) -> list[list[int]]:
    """Head budgets ``[num_layers][num_kv_heads]`` of allocator ``name`` (see the module doc).

    ``total_per_head``: mean entries per (layer, head), so the total is ``total_per_head * L * H``;
    ``floor``: the least budget of any head (use the protected tokens, sink + recent window);
    ``scores``: the `ScoreProfile` ``xkv`` needs; ``weights``: the ``[L][H]`` table ``weighted`` needs.
    ``adakv`` returns the uniform (layer-total) budgets; pair it with ``head_allocation="adaptive"``
    (`eviction_overrides` does).
    """
    if name in ("uniform", "adakv"):
        return uniform(total_per_head, num_layers, num_kv_heads, floor)
    if name == "pyramid":
        return pyramid(total_per_head, num_layers, num_kv_heads, floor, beta=beta, cap=cap)
    if name == "xkv":
        if scores is None:
            raise ValueError("xkv needs a ScoreProfile (scores=profile_scores(model, ...))")
        return xkv(scores, total_per_head, num_layers, num_kv_heads, floor)
    if name == "weighted":
        if weights is None:
            raise ValueError("weighted needs weights [num_layers][num_kv_heads]")
        if len(weights) != num_layers or any(len(r) != num_kv_heads for r in weights):
            raise ValueError(f"weights must be [{num_layers}][{num_kv_heads}]")
        return weighted(weights, total_per_head, floor, cap)
    raise ValueError(f"unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}")


def eviction_overrides(name: str, budgets: list[list[int]], adaptive_floor: float | None = None) -> dict[str, Any]:
    """`EvictionConfig` fields that apply an allocation (``adakv`` adds the adaptive split)."""
    out: dict[str, Any] = {"head_budgets": [list(r) for r in budgets], "head_allocation": "fixed"}
    if name == "adakv":
        out["head_allocation"] = "adaptive"
        if adaptive_floor is not None:
            out["adaptive_floor"] = adaptive_floor
    return out


def check_allocation(budgets: Sequence[Sequence[int]], total_per_head: int, floor: int) -> None:
    """Raise unless ``budgets`` sums to ``total_per_head * L * H`` and every entry is >= ``floor``."""
    flat = [int(b) for row in budgets for b in row]
    if sum(flat) != total_per_head * len(flat):
        raise AssertionError(f"allocation sums to {sum(flat)}, expected {total_per_head * len(flat)}")
    if min(flat) < floor:
        raise AssertionError(f"allocation has an entry {min(flat)} below the floor {floor}")


def layer_bytes(budgets: Sequence[Sequence[int]], batch: int, head_dim: int, element_size: int) -> list[int]:
    """Bytes of keys + values each layer holds once full: ``2 * B * H * max_h(budget) * D * elt`` (heads are
    padded to the layer's largest)."""
    return [2 * batch * len(row) * max(row) * head_dim * element_size for row in budgets]


# ---------------------------------------------------------------------------------------------------------
# Ada-KV: the runtime split of a layer's total across heads
# ---------------------------------------------------------------------------------------------------------
def adaptive_head_counts(layer, budgets: torch.Tensor, config) -> torch.Tensor:
    """Per-(row, head) counts ``[B, H]`` for one eviction of ``layer`` under Ada-KV.

    The layer keeps ``total = sum(budgets)`` entries per row. Each head first keeps its protected tokens
    and its top ``ceil(adaptive_floor * total / H)`` entries (the safeguard); the rest of the total goes to
    the best remaining scores of all heads jointly. Scores must be comparable across the heads of a
    layer (attention mass, gate logits, Locret scores are).
    """
    scores, valid = layer.scores, layer.valid_mask()
    b, h, length = scores.shape
    total = int(budgets.sum())
    protected = layer.protected_mask(config.sink_tokens, config.recent_window)
    n_valid = valid.sum(-1)  # [B, H]
    if total >= h * length:
        return n_valid
    safe = math.ceil(config.adaptive_floor * total / h)
    floor = torch.maximum(protected.sum(-1), torch.full_like(n_valid, safe))
    floor = torch.minimum(floor, n_valid)
    priority = scores.float().masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
    k = int(floor.max()) if floor.numel() else 0
    if k > 0:  # the safeguard: each head's top-`floor` entries are taken first
        top = priority.topk(min(k, length), dim=-1).indices  # [B, H, k]
        rank_ok = torch.arange(top.shape[-1], device=priority.device) < floor[..., None]
        boost = torch.zeros_like(valid).scatter(-1, top, rank_ok)
        priority = priority.masked_fill(boost & valid, float("inf"))
    flat = priority.reshape(b, h * length)
    take = min(total, h * length)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(-1, flat.topk(take, dim=-1).indices, True)
    counts = (chosen.view(b, h, length) & valid).sum(-1)
    return torch.maximum(counts, floor)


__all__ = [
    "ALLOCATORS", "SPELLINGS", "ScoreProfile", "adaptive_head_counts", "allocate", "check_allocation",
    "eviction_overrides", "greedy_counts", "keep_entries", "layer_bytes", "parse_budget", "pyramid", "ratio_entries",
    "round_to_total", "uniform", "water_fill", "weighted", "weighted_budgets", "xkv",
]
