"""Natural-text quality under eviction: KL divergence to the full-cache model and perplexity.

Text: the held-out prose of the EVAL split (:func:`trainkv.data.haystack.prose_text`, the even chapters
of *Alice's Adventures in Wonderland*; training only ever reads the odd chapters), tokenized without
special tokens and cut into non-overlapping segments of ``context_length`` tokens from its start.

Each segment is fed chunk by chunk (``kl_chunk_size`` tokens, chunks from the first token) through an
evicting cache holding ``budget`` entries per (layer, KV head), with the sweep's protected tokens
(4 sinks, a recent window of ``min(32, budget // 4)``). A token in chunk ``m`` attends to what survived
the eviction after chunk ``m - 1`` plus its own chunk, so the chunk should be small against the
budget (default 64): a chunk as long as the text would never evict. The same segment is fed in lockstep
through a cache that never evicts (the full-cache model; equal to plain transformers by invariant 1).
At every position ``t``:

* ``KL(full || evicted)`` of the next-token distributions, ``sum_v p_full(v) (log p_full(v) - log p_ev(v))``
  in nats;
* the negative log-likelihood of the actual next token under each model.

Reported, pooled over all segments: mean KL and perplexity ``exp(mean NLL)`` over positions
``budget <= t < context_length - 1`` (before the first ``budget`` tokens nothing can have been evicted),
plus the mean KL over all positions (``kl_all``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from trainkv.data.haystack import PROSE_SOURCE, prose_text
from trainkv.eval.records import device_name, now, package_versions, write_json
from trainkv.eval.spec import (
    FULL, NO_EVICTION_BUDGET, SPLIT, MethodSpec, budget_label, eviction_settings, keep_entries, keep_ratio, sanitize,
)

QUALITY_SCHEMA = "trainkv.eval.quality/1"
QUALITY_RESUME_KEYS = ("model", "method", "budget", "context_length", "segments", "split", "eviction", "kl_chunk_size",
                       "start", "dtype")


def prose_segments(tokenizer, length: int, n: int, split: str = SPLIT) -> list[list[int]]:
    """Up to ``n`` non-overlapping ``length``-token segments of the split's prose, from its start."""
    ids = list(tokenizer.encode(prose_text(split), add_special_tokens=False))
    count = min(n, len(ids) // length)
    if count < n:
        warnings.warn(f"the {split} prose holds {len(ids)} tokens: only {count} segments of {length} tokens")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


@torch.no_grad()
def quality_batch(
    model, ids: torch.Tensor, evictions: Sequence[dict[str, Any]], chunk_size: int, starts: Sequence[int],
) -> list[dict[str, Any]]:
    """KL / NLL sums of one batch of equal-length segments for several eviction settings at once.

    ``model`` has a method attached; ``evictions[i]`` are cache overrides (``None``: never evict);
    ``starts[i]`` is the first position counted for setting ``i``. Returns per setting and per row:
    ``kl_sum``, ``kl_all_sum``, ``nll_sum``, ``nll_full_sum``, ``positions`` and ``positions_all``.
    """
    b, length = ids.shape
    def no_eviction():
        cache = model.new_cache({"budget": NO_EVICTION_BUDGET})
        cache.eviction_enabled = False  # also for threshold-mode methods, which evict below the threshold
        return cache

    full_cache = no_eviction()
    caches = [model.new_cache(ev) if ev is not None else no_eviction() for ev in evictions]
    for cache in caches:
        cache.decode_horizon = length  # every token the cache will see (EvictionConfig.budget_for caps by it)
    zeros = lambda: torch.zeros(b, dtype=torch.float64)  # noqa: E731
    sums = [{k: zeros() for k in ("kl_sum", "kl_all_sum", "nll_sum", "nll_full_sum")} for _ in evictions]
    counts = [[0, 0] for _ in evictions]
    for s, e in _chunks(length, chunk_size):
        chunk = ids[:, s:e]
        ref = model(input_ids=chunk, cache=full_cache).logits.float().log_softmax(-1)  # [B, c, V]
        p_ref = ref.exp()
        pos = torch.arange(s, e)
        has_target = pos < length - 1
        targets = ids[:, s + 1:e + 1]  # next tokens of the positions that have one
        n_t = targets.shape[1]
        nll_ref = -ref[:, :n_t].gather(-1, targets[..., None])[..., 0]  # [B, n_t]
        for i, cache in enumerate(caches):
            logp = model(input_ids=chunk, cache=cache).logits.float().log_softmax(-1)
            kl = (p_ref * (ref - logp)).sum(-1).clamp(min=0).double().cpu()  # [B, c]
            nll = -logp[:, :n_t].gather(-1, targets[..., None])[..., 0]
            counted = (pos >= starts[i]) & has_target
            sums[i]["kl_all_sum"] += kl.sum(-1)
            sums[i]["kl_sum"] += kl[:, counted].sum(-1)
            sums[i]["nll_sum"] += nll.double().cpu()[:, counted[:n_t]].sum(-1)
            sums[i]["nll_full_sum"] += nll_ref.double().cpu()[:, counted[:n_t]].sum(-1)
            counts[i][0] += int(counted.sum())
            counts[i][1] += e - s
    out = []
    for i in range(len(evictions)):
        out.append({**{k: v.tolist() for k, v in sums[i].items()}, "positions": counts[i][0], "positions_all": counts[i][1]})
    return out


def summarize_quality(per_segment: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled mean KL and perplexities over the segments' counted positions."""
    pos = sum(s["positions"] for s in per_segment)
    pos_all = sum(s["positions_all"] for s in per_segment)
    kl = sum(s["kl_sum"] for s in per_segment)
    kl_all = sum(s["kl_all_sum"] for s in per_segment)
    nll = sum(s["nll_sum"] for s in per_segment)
    nll_full = sum(s["nll_full_sum"] for s in per_segment)
    return {
        "kl": kl / pos if pos else 0.0,
        "kl_all": kl_all / pos_all if pos_all else 0.0,
        "ppl": math.exp(nll / pos) if pos else math.nan,
        "ppl_full": math.exp(nll_full / pos) if pos else math.nan,
        "positions": pos,
        "segments": len(per_segment),
    }


def quality_path(out: Path, spec: MethodSpec, length: int, budget) -> Path:
    return out / "quality" / f"{sanitize(spec.label)}__L{length}__{budget_label(budget)}.json"


def run_quality(sweep) -> list[Path]:
    """KL / perplexity for every method x budget x context length of a :class:`~trainkv.eval.runner.Sweep`."""
    c = sweep.config
    tok = sweep.tokenizer
    written: list[Path] = []
    segments = {length: prose_segments(tok, length, c.kl_samples) for length in c.context_lengths}
    plan: dict[MethodSpec, list[tuple[int, Any, Path, dict]]] = {}
    for spec in c.method_specs():
        for length in c.context_lengths:
            for budget in ([None] if spec.is_full else c.keep):
                path = quality_path(sweep.out, spec, length, budget)
                config = quality_config(sweep, spec, length, budget, len(segments[length]))
                if not c.overwrite and path.exists():
                    try:
                        old = json.loads(path.read_text())["config"]
                    except (ValueError, KeyError):
                        old = None
                    if old is not None:
                        differ = [k for k in QUALITY_RESUME_KEYS if old.get(k) != config.get(k)]
                        if differ:
                            raise RuntimeError(f"{path} exists but was run with other settings ({', '.join(differ)}); "
                                               "use another --output directory or --overwrite")
                        written.append(path)
                        continue
                plan.setdefault(spec, []).append((length, budget, path, config))
    total = sum(len(segments[length]) for items in plan.values() for length, *_ in items)
    bar = tqdm(total=total, desc="quality", unit="segment", disable=not c.progress or not total, dynamic_ncols=True)
    for spec, items in plan.items():
        model = sweep.attach(spec)
        device = next(model.parameters()).device
        try:
            for length in sorted({it[0] for it in items}):
                todo = [it for it in items if it[0] == length]
                evictions = [it[3]["eviction"] for it in todo]
                starts = [it[3]["start"] for it in todo]
                rows: list[list[dict]] = [[] for _ in todo]
                t0 = time.perf_counter()
                segs = segments[length]
                for k in range(0, len(segs), max(1, c.batch_size)):
                    batch = segs[k:k + max(1, c.batch_size)]
                    ids = torch.tensor(batch, dtype=torch.long, device=device)
                    res = quality_batch(model, ids, evictions, c.kl_chunk_size, starts)
                    for i, r in enumerate(res):
                        for j in range(len(batch)):
                            rows[i].append({
                                "offset": (k + j) * length, "kl_sum": r["kl_sum"][j], "kl_all_sum": r["kl_all_sum"][j],
                                "nll_sum": r["nll_sum"][j], "nll_full_sum": r["nll_full_sum"][j],
                                "positions": r["positions"], "positions_all": r["positions_all"],
                            })
                    bar.update(len(batch))
                seconds = time.perf_counter() - t0
                for (length_, budget, path, config), per_segment in zip(todo, rows):
                    config["method_config"] = sweep.method_config(model)
                    record = {
                        "schema": QUALITY_SCHEMA, "kind": "quality", "config": config, "split": SPLIT,
                        "tokenizer": getattr(tok, "name_or_path", type(tok).__name__), "versions": package_versions(),
                        "device": device_name(c.device), "date": now(),
                        "aggregate": summarize_quality(per_segment),
                        "timing": {"seconds_all_budgets": round(seconds, 3)},
                        "per_segment": per_segment,
                    }
                    write_json(path, record)
                    written.append(path)
                    agg = record["aggregate"]
                    bar.write(f"{spec.label:>24} L={length:<6} {budget_label(budget):>8}: KL {agg['kl']:.4f}  "
                              f"ppl {agg['ppl']:.2f} (full {agg['ppl_full']:.2f})")
        finally:
            sweep._detach(model)
    bar.close()
    return written


def quality_config(sweep, spec: MethodSpec, length: int, budget, n_segments: int) -> dict[str, Any]:
    c = sweep.config
    if spec.is_full or budget is None:
        entries, eviction = None, None
        budget_info = {"spec": None, "label": FULL, "entries": None, "keep_ratio": 1.0}
        start = 0
    else:
        entries = keep_entries(budget, length)
        eviction = eviction_settings(entries, c.kl_chunk_size, c.sink_tokens, sweep.recent_window(spec, entries))
        budget_info = {"spec": budget, "label": budget_label(budget), "entries": entries,
                       "keep_ratio": keep_ratio(budget, length)}
        start = entries
    return {
        "model": c.model, "method": spec.to_dict(), "budget": budget_info, "context_length": length,
        "segments": n_segments, "split": SPLIT, "text": PROSE_SOURCE + " (EVAL split: even chapters)",
        "eviction": eviction, "kl_chunk_size": c.kl_chunk_size, "start": start, "dtype": c.dtype,
        "batch_size": c.batch_size, "device": c.device,
    }


__all__ = ["prose_segments", "quality_batch", "run_quality", "summarize_quality"]
