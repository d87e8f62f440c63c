"""How one total KV budget is split over layers and KV heads: rule-based allocators on one interface.

    budgets = allocate("pyramid", total_per_head=128, num_layers=30, num_kv_heads=3, floor=36)
    model.new_cache({"head_budgets": budgets})                       # a fixed allocation
    model.new_cache(eviction_overrides("adakv", budgets))            # Ada-KV: adaptive split inside layers

Every allocator returns integer budgets ``[num_layers][num_kv_heads]`` that sum exactly to
``total_per_head * num_layers * num_kv_heads`` and are each at least ``floor`` (the protected sink +
recent-window tokens, which count inside the budget):

* ``uniform``: every (layer, head) gets ``total_per_head``.
* ``pyramid``: PyramidKV's linear decay over layers (Cai et al., arXiv 2406.02069; kvpress
  ``PyramidKVPress``): with ``base = total_per_head - floor`` evictable entries per head,
  ``k_min = base / beta``, ``k_max = 2 base - k_min``, layer ``l`` gets ``floor + k_max - l (k_max - k_min) / (L - 1)``
  (beta = 20), the same for every head of the layer. kvpress falls back to uniform when
  ``k_min < window`` (it always would at our budgets); this follows the original KVCache-Factory code,
  which has no such fallback.
* ``xkv``: XKV's greedy marginal allocation (Li et al., arXiv 2412.05896, ``xkv_utils.py``) from a
  `ScoreProfile`: per sample, the gain of a layer's k-th slot is ``sum over heads of the k-th largest
  score / the layer's total score``; the greedy (= exact optimum of this separable concave problem)
  gives each layer its count of slots, one budget per layer shared by its heads; allocations are
  averaged over the profiled samples and rounded (XKV's per-task amortisation).
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

Profiling (`profile_scores`): the model runs with its method attached and nothing evicted (one-shot
prefill, threshold mode with threshold -inf, so attention-based scorers compute their scores too) on
a few TRAIN-split samples; each layer's per-head scores of the evictable tokens (not sinks, not the
recent window) are mapped to non-negative importances and sorted. The score is the method's own:
SnapKV / H2O / TOVA / CORM attention mass as is (XKV's own choice is SnapKV), Attention-Gate and
layer-budget keep-logits through a sigmoid (keep probability), Locret scores (pre-softmax logit
maxima) through a softmax over the tokens of each head.

`compare` runs the allocators side by side with one scorer on the evaluation split
(``python -m trainkv.allocation --help``); ``python -m trainkv.allocation measure --help`` builds a
``layer_budget`` checkpoint from a trained scorer's measured keep fractions without training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch

ALLOCATORS = ("uniform", "pyramid", "xkv", "adakv", "weighted")
PYRAMID_BETA = 20.0


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
def _weighted_cached(weights: tuple, total_per_head: int, floor: int) -> tuple:
    return tuple(tuple(row) for row in weighted(weights, total_per_head, floor))


def weighted_budgets(weights: Sequence[Sequence[float]], total_per_head: int, floor: int) -> tuple:
    """`weighted` with a cache (the runtime asks once per layer and forward)."""
    return _weighted_cached(tuple(tuple(float(w) for w in row) for row in weights), int(total_per_head), int(floor))


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


# ---------------------------------------------------------------------------------------------------------
# score profiles (for xkv)
# ---------------------------------------------------------------------------------------------------------
TRANSFORMS = {"attention_gate": "sigmoid", "layer_budget": "sigmoid", "retaining_head": "softmax"}


def _importance(scores: torch.Tensor, transform: str) -> torch.Tensor:
    """Non-negative importances from a method's scores ``[H, n]`` (module doc)."""
    scores = scores.float()
    if transform == "sigmoid":
        return torch.sigmoid(scores)
    if transform == "softmax":
        return torch.softmax(scores, dim=-1)
    if transform == "identity":
        return scores.clamp(min=0.0)
    raise ValueError(f"unknown transform {transform!r}: sigmoid, softmax or identity")


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


@torch.no_grad()
def profile_scores(model, contexts: Sequence[Sequence[int]], *, transform: str = "auto", sink_tokens: int = 4,
                   recent_window: int = 32) -> ScoreProfile:
    """Run ``model`` (a method attached) on each token-id list of ``contexts`` with nothing evicted and
    collect each layer's per-head importances of the evictable tokens (module doc)."""
    state = model.trainkv_state
    name = state.method.name
    if transform == "auto":
        transform = TRANSFORMS.get(name, "identity")
    device = next(model.parameters()).device
    out = ScoreProfile([], [], method=name, transform=transform)
    for ids in contexts:
        n = len(ids)
        cache = model.new_cache({"mode": "threshold", "threshold": float("-inf"), "budget": max(n, sink_tokens + recent_window),
                                 "chunk_size": max(n, 1), "sink_tokens": sink_tokens, "recent_window": recent_window,
                                 "head_allocation": "fixed", "head_budgets": None, "layer_budgets": None,
                                 "allocation_weights": None})
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        model(input_ids=x, attention_mask=torch.ones_like(x), cache=cache, logits_to_keep=1)
        gains, heads = [], []
        for layer in cache.layers:
            pos = layer.positions[0]  # [H, n]
            keep = (pos >= sink_tokens) & (pos <= n - 1 - recent_window)
            imp = _importance(layer.scores[0], transform)
            imp = torch.where(keep, imp, torch.zeros_like(imp))
            imp = imp / imp.sum(-1, keepdim=True).clamp(min=1e-30) if transform == "softmax" else imp
            srt = imp.sort(dim=-1, descending=True).values[:, : int(keep[0].sum())].cpu()  # [H, evictable]
            heads.append(srt)
            tot = float(srt.sum())
            gains.append(srt.sum(0) / tot if tot > 0 else torch.zeros(srt.shape[1]))
        out.layer_gains.append(gains)
        out.head_sorted.append(heads)
        out.context_tokens.append(n)
    return out


# ---------------------------------------------------------------------------------------------------------
# side-by-side comparison on the evaluation split
# ---------------------------------------------------------------------------------------------------------
def learned_weights(checkpoint: str) -> list[list[float]]:
    """The ``allocation_weights`` saved in a ``layer_budget`` checkpoint's eviction settings."""
    from .hub.checkpoint import GateCheckpoint
    from .hub.load import resolve_checkpoint

    config = GateCheckpoint.load(resolve_checkpoint(checkpoint)).config
    weights = config.get("eviction", {}).get("allocation_weights")
    if weights is None:
        raise ValueError(f"{checkpoint}: its eviction settings hold no allocation_weights (not a trained layer_budget?)")
    return weights


def compare(model_name: str = "smollm2-135m", scorer: str = "snapkv", checkpoint: str | None = None,
            allocators: Sequence[str] = ("uniform", "pyramid", "adakv", "xkv"), learned: dict[str, str] | None = None,
            budgets: Sequence[float] = (0.125, 0.0625), context_length: int = 1024, tasks: Sequence[str] = ("niah_single_1",),
            samples: int = 5, seed: int | None = None, profile_samples: int = 4, chunk_size: int | None = 512,
            full: bool = True, dtype: str = "float32", device: str | None = None, batch_size: int = 1,
            output: str | None = None, command: str | None = None, progress: bool = True,
            max_new_tokens: int | None = None, task_eval: bool = True, kl_segments: int = 0,
            kl_chunk_size: int = 64, learned_adaptive: bool = False) -> dict:
    """Evaluate each allocator with the same scorer and total budget on the evaluation split.

    ``scorer``: a training-free method name, or the label of ``checkpoint`` (a trained gate checkpoint,
    whose method then scores). ``learned``: ``{label: layer_budget checkpoint}``; its learned
    ``allocation_weights`` are applied with this same scorer. Budgets are keep ratios of
    ``context_length`` (as ``trainkv eval``: ``round(r * context_length)`` entries per head on average,
    4 sinks, recent window ``min(32, budget // 4)``). xkv is profiled on ``profile_samples`` TRAIN-split
    samples per task. ``kl_segments`` > 0 also measures, per allocator, the KL divergence to the full cache
    and the perplexity on that many ``context_length``-token segments of the EVAL-split prose
    (`trainkv.eval.quality`, fed in chunks of ``kl_chunk_size``); ``task_eval=False`` skips the tasks.
    ``learned_adaptive``: also run each learned allocation as layer totals split across the layer's heads by
    Ada-KV at every eviction (``learned+adakv:<label>``).
    Returns (and writes to ``output``) a JSON-ready record.
    """
    import json
    import time

    import trainkv
    from .data.tasks import generate_samples
    from .eval.prompts import build_prompt
    from .eval.runner import (DEFAULT_SEED, DTYPES, NO_EVICTION_BUDGET, aggregate, device_name, eviction_settings,
                              evaluate_samples, now, package_versions, resolve_budget, samples_digest)

    seed = DEFAULT_SEED if seed is None else seed
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = trainkv.load_tokenizer(model_name)
    model = trainkv.load_model(model_name, dtype=DTYPES[dtype], device=device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    base = {"budget": NO_EVICTION_BUDGET, "chunk_size": chunk_size or NO_EVICTION_BUDGET}
    if checkpoint is not None:
        from .hub import load_gated

        load_gated(checkpoint, model=model, **base)
    else:
        trainkv.attach(model, scorer, trainkv.EvictionConfig(**base))
    text = model.config.get_text_config(decoder=True)
    num_layers, num_heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = next(model.parameters()).element_size()
    eval_samples = [s for t in tasks for s in generate_samples(t, tok, samples, context_length, seed=seed, split="eval")]
    weights = {label: learned_weights(path) for label, path in (learned or {}).items()}
    record: dict[str, Any] = {
        "schema": "trainkv.allocation.compare/1", "command": command, "model": model_name,
        "scorer": {"method": model.trainkv_state.method.name, "checkpoint": checkpoint},
        "context_length": context_length, "tasks": list(tasks), "samples_per_task": samples, "seed": seed,
        "split": "eval", "chunk_size": chunk_size, "dtype": dtype, "max_new_tokens": max_new_tokens,
        "samples_digest": samples_digest(eval_samples),
        "learned": dict(learned or {}), "device": device_name(device), "versions": package_versions(), "date": now(),
        "runs": [],
    }
    t_start = time.perf_counter()

    def save():
        from pathlib import Path

        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        record["seconds"] = round(time.perf_counter() - t_start, 1)
        path.write_text(json.dumps(record, indent=1))

    def run(label, budget, eviction, budgets=None):
        t0 = time.perf_counter()
        results = evaluate_samples(model, tok, eval_samples, eviction=eviction, chunk_size=chunk_size,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens)
        agg = aggregate(results)
        entry = {"allocator": label, "budget": budget, "score": agg["score"], "per_task": agg["per_task"],
                 "compression_mean": agg["compression_mean"], "seconds": round(time.perf_counter() - t0, 2)}
        if budgets is not None:
            entry["head_budgets"] = budgets
            entry["kv_bytes_per_sample"] = sum(layer_bytes(budgets, 1, head_dim, element))
            entry["kept_entries"] = sum(map(sum, budgets))
        record["runs"].append(entry)
        if output:  # after every run: a killed comparison keeps what it finished
            save()
        if progress:
            print(f"{label:>12} budget {budget!s:>8}: score {agg['score']:6.2f}  compression "
                  f"{agg['compression_mean']:.3f}  {entry['seconds']:.0f}s", flush=True)
        return entry

    if full and task_eval:
        run("full", None, {"budget": NO_EVICTION_BUDGET})
    segments = None
    if kl_segments:
        from .eval.quality import prose_segments

        segments = prose_segments(tok, context_length, kl_segments)
        record["kl"] = {"segments": len(segments), "chunk_size": kl_chunk_size, "split": "eval", "runs": []}
    profiles: dict[tuple[int, int], ScoreProfile] = {}
    contexts = None
    for ratio in budgets:
        entries = resolve_budget(ratio, context_length)
        eviction = eviction_settings(entries, chunk_size)
        floor = eviction["sink_tokens"] + eviction["recent_window"]
        profile = None
        if "xkv" in allocators:  # profiled on TRAIN-split samples, with this budget's protected tokens
            if contexts is None:
                train = [s for t in tasks for s in generate_samples(t, tok, profile_samples, context_length, seed=seed,
                                                                     split="train")]
                contexts = [build_prompt(s, tok).context_ids for s in train]
            key = (eviction["sink_tokens"], eviction["recent_window"])
            if key not in profiles:
                profiles[key] = profile_scores(model, contexts, sink_tokens=key[0], recent_window=key[1])
            profile = profiles[key]
            record["xkv_profile"] = {"samples": len(contexts), "transform": profile.transform,
                                     "context_tokens": profile.context_tokens, "split": "train"}
        names = list(allocators) + [f"learned:{label}" for label in weights]
        if learned_adaptive:
            names += [f"learned+adakv:{label}" for label in weights]
        settings = []
        for name in names:
            if name.startswith(("learned:", "learned+adakv:")):
                budgets_lh = weighted(weights[name.split(":", 1)[1]], entries, floor)
                overrides = eviction_overrides("adakv" if name.startswith("learned+adakv:") else "weighted", budgets_lh)
            else:
                budgets_lh = allocate(name, entries, num_layers, num_heads, scores=profile, floor=floor)
                overrides = eviction_overrides(name, budgets_lh)
            check_allocation(budgets_lh, entries, floor)
            settings.append((name, overrides, budgets_lh))
        for name, overrides, budgets_lh in settings if task_eval else []:
            entry = run(name, ratio, {**eviction, **overrides}, budgets_lh)
            if profile is not None and "adakv" not in name:
                entry["xkv_retained_importance"] = profile.retained(budgets_lh, floor)
        if segments:
            from .eval.quality import quality_batch, summarize_quality

            t0 = time.perf_counter()
            evictions = [{**eviction_settings(entries, kl_chunk_size), **o} for _, o, _ in settings]
            per = [[] for _ in settings]
            for seg in segments:
                ids = torch.tensor([seg], dtype=torch.long, device=device)
                for i, r in enumerate(quality_batch(model, ids, evictions, kl_chunk_size, [entries] * len(settings))):
                    per[i].append({k: (v[0] if isinstance(v, list) else v) for k, v in r.items()})
            for (name, _, budgets_lh), rows in zip(settings, per):
                q = summarize_quality(rows)
                record["kl"]["runs"].append({"allocator": name, "budget": ratio, **q})
                if progress:
                    print(f"{name:>12} budget {ratio!s:>8}: KL {q['kl']:.4f}  ppl {q['ppl']:.3f} (full "
                          f"{q['ppl_full']:.3f})", flush=True)
            record["kl"]["seconds"] = round(record["kl"].get("seconds", 0) + time.perf_counter() - t0, 1)
            if output:
                save()
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    if output:
        save()
    return record


def summary_table(record: dict) -> str:
    """Markdown: score per allocator (rows) and budget (columns), with the full-cache score."""
    runs = record["runs"]
    budgets = sorted({r["budget"] for r in runs if r["budget"] is not None}, reverse=True)
    names = list(dict.fromkeys(r["allocator"] for r in runs if r["budget"] is not None))
    lines = ["| allocator | " + " | ".join(f"keep {b:g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)] if budgets else []
    for name in names:
        cells = []
        for b in budgets:
            hit = [r for r in runs if r["allocator"] == name and r["budget"] == b]
            cells.append(f"{hit[0]['score']:.1f}" if hit else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    full = [r for r in runs if r["allocator"] == "full"]
    if full:
        lines.append(f"| full cache | {full[0]['score']:.1f} |" + " |" * (len(budgets) - 1))
    kl = record.get("kl", {}).get("runs", [])
    if kl:
        kb = sorted({r["budget"] for r in kl}, reverse=True)
        lines += ([""] if lines else []) + ["| allocator | " + " | ".join(f"KL at keep {b:g}" for b in kb) + " |",
                                            "|---|" + "---|" * len(kb)]
        for name in dict.fromkeys(r["allocator"] for r in kl):
            cells = [next((f"{r['kl']:.4f}" for r in kl if r["allocator"] == name and r["budget"] == b), "") for b in kb]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shlex
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["measure"]:  # a layer_budget checkpoint measured from a trained scorer (no training)
        from .methods.layer_budget import main as measure

        return measure(argv)
    p = argparse.ArgumentParser(prog="python -m trainkv.allocation", description="compare budget allocators with one scorer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scorer", default="snapkv", help="training-free method (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="trained scorer checkpoint (e.g. checkpoints/smollm2-135m/attention_gate)")
    p.add_argument("--allocators", default="uniform,pyramid,adakv,xkv")
    p.add_argument("--learned", action="append", default=[], metavar="NAME=PATH",
                   help="a layer_budget checkpoint whose learned allocation is applied with the same scorer")
    p.add_argument("--budgets", default="0.125,0.0625", help="keep ratios of --context-length")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--tasks", default="niah_single_1")
    p.add_argument("--samples", type=int, default=5, help="per task")
    p.add_argument("--profile-samples", type=int, default=4, help="TRAIN-split samples per task for xkv's profile")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on each sample's generation budget")
    p.add_argument("--kl-segments", type=int, default=0,
                   help="also the KL to the full cache / perplexity on this many EVAL-split prose segments")
    p.add_argument("--kl-chunk-size", type=int, default=64)
    p.add_argument("--no-tasks", action="store_true", help="skip the task evaluation (e.g. KL only)")
    p.add_argument("--device", default=None)
    p.add_argument("--learned-adaptive", action="store_true",
                   help="also run each --learned allocation as layer totals with Ada-KV's adaptive split across heads")
    p.add_argument("--output", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    learned = dict(item.split("=", 1) for item in args.learned)
    tasks = args.tasks.split(",")
    if tasks == ["ruler"]:
        from .data.tasks import RULER_TASKS

        tasks = list(RULER_TASKS)
    record = compare(
        args.model, args.scorer, args.checkpoint, [a for a in args.allocators.split(",") if a], learned,
        [float(b) for b in args.budgets.split(",")], args.context_length, tasks, args.samples, args.seed,
        args.profile_samples, args.chunk_size or None, not args.no_full, args.dtype, args.device, args.batch_size,
        args.output, command="python -m trainkv.allocation " + " ".join(shlex.quote(a) for a in argv),
        max_new_tokens=args.max_new_tokens, task_eval=not args.no_tasks, kl_segments=args.kl_segments,
        kl_chunk_size=args.kl_chunk_size, learned_adaptive=args.learned_adaptive,
    )
    print(summary_table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "ALLOCATORS", "ScoreProfile", "adaptive_head_counts", "allocate", "check_allocation", "compare", "eviction_overrides",
    "greedy_counts", "layer_bytes", "learned_weights", "profile_scores", "pyramid", "round_to_total", "summary_table",
    "uniform", "water_fill", "weighted", "weighted_budgets", "xkv",
]
