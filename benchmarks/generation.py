"""Timed generation helpers shared by the runtime benchmarks: prefill + decode runs, decode-rate loops over
caches filled with random K/V, the largest batch that fits. Device-agnostic (CUDA, or CPU for smoke runs)."""

from __future__ import annotations

import gc

import torch
from common import measure
from transformers import DynamicCache

import trainkv


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def text_shape(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder."""
    from trainkv.hub.format import base_shape

    shape = base_shape(model)
    return shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]


def kv_bytes_per_token(model) -> int:
    layers, heads, head_dim = text_shape(model)
    return 2 * layers * heads * head_dim * next(model.parameters()).element_size()


def weights_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def run_generate(model, ids, new_tokens: int, chunk: int, cache=None) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=chunk)
    if cache is not None:
        kwargs["cache"] = cache
    with torch.no_grad(), measure() as m:
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return m


def random_prompt(model, context: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return torch.randint(100, min(20000, vocab), (batch, context), generator=gen).to(device_of(model))


def prefill_and_decode(model, context: int, new_tokens: int, chunk: int, make_cache) -> dict:
    """Peak memory and time of prefill + ``new_tokens``; prefill time from a separate 1-token run.

    ``make_cache()`` returns a fresh cache, or None for the model's default (a full `DynamicCache`)."""
    ids = random_prompt(model, context)
    first = run_generate(model, ids, 1, chunk, make_cache())
    cleanup()
    cache = make_cache()
    full = run_generate(model, ids, new_tokens, chunk, cache)
    kept = cache.nbytes()["kv"] if isinstance(cache, trainkv.EvictingCache) else None
    del cache
    cleanup()
    decode_s = max(1e-9, full["seconds"] - first["seconds"])
    peak = [m["peak_gib"] for m in (first, full) if "peak_gib" in m]
    return {
        "context": context,
        "new_tokens": new_tokens,
        "prefill_seconds": round(first["seconds"], 3),
        "prefill_tokens_per_s": round(context / first["seconds"], 1),
        "total_seconds": round(full["seconds"], 3),
        "decode_tokens_per_s": round((new_tokens - 1) / decode_s, 2),
        "peak_gib": round(max(peak), 3) if peak else None,
        "kv_cache_gib_held_at_end": round(kept / 2**30, 4) if kept is not None else None,
    }


def fill_full_cache(model, batch: int, context: int) -> DynamicCache:
    """A full `DynamicCache` holding ``context`` tokens of random K/V per layer."""
    layers, heads, head_dim = text_shape(model)
    dev, dtype = device_of(model), next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        k = torch.randn(batch, heads, context, head_dim, device=dev, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def fill_evicting_cache(model, batch: int, context: int, budget: int):
    """An `EvictingCache` that has seen ``context`` tokens and holds ``budget`` entries per head (random K/V)."""
    _, heads, head_dim = text_shape(model)
    dev, dtype = device_of(model), next(model.parameters()).dtype
    cache = model.new_cache(model.trainkv_state.eviction.replace(budget=budget))
    positions = torch.linspace(0, context - 1, budget, device=dev).long()
    for layer in cache.layers:
        k = torch.randn(batch, heads, budget, head_dim, device=dev, dtype=dtype)
        layer.lazy_initialization(k, k)
        layer.keys, layer.values = k, torch.randn_like(k)
        layer.positions = positions.expand(batch, heads, budget).contiguous()
        layer.scores = torch.randn(batch, heads, budget, device=dev)
        layer.seen = context
    return cache


def decode_rate(model, cache, batch: int, context: int, steps: int) -> dict:
    """Tokens/s of ``steps`` one-token forwards (after 3 warm-up steps) on a pre-filled cache."""
    dev = device_of(model)
    token = torch.randint(100, 20000, (batch, 1), device=dev)
    mask = torch.ones(batch, context + steps + 4, device=dev, dtype=torch.long)

    def step(i):
        model(input_ids=token, cache=cache, attention_mask=mask[:, : context + i + 1],
              position_ids=torch.full((batch, 1), context + i, device=dev), logits_to_keep=1)

    with torch.no_grad():
        for i in range(3):
            step(i)
        with measure() as m:
            for i in range(3, steps + 3):
                step(i)
    return {"batch": batch, "steps": steps, "seconds": round(m["seconds"], 3),
            "tokens_per_s": round(batch * steps / m["seconds"], 1),
            "peak_gib": round(m["peak_gib"], 2) if "peak_gib" in m else None}


def sweep_batches(try_batch, candidates) -> list[dict]:
    """``try_batch(b)`` for increasing ``b`` until one runs out of memory; every result that fit, in order."""
    rows = []
    for b in candidates:
        try:
            rows.append(try_batch(b))
            print(rows[-1], flush=True)
        except torch.OutOfMemoryError:
            cleanup()
            print({"batch": b, "oom": True}, flush=True)
            break
        cleanup()
    return rows


def largest_batch(try_batch, candidates) -> dict | None:
    """The result of the largest candidate batch that fits (see `sweep_batches`)."""
    rows = sweep_batches(try_batch, candidates)
    return rows[-1] if rows else None
