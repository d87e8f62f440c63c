"""Invariant 4: the cache's memory is the kept entries, not a mask over the full length.

KV bytes held (`cache.nbytes()["kv"]`, and the bytes of the tensors' actual storage) equal
``2 * layers * batch * kv_heads * budget * head_dim * element_size`` -- proportional to the budget and
the same at 256 and 1024 tokens of context.
"""

from __future__ import annotations

import pytest

from runtime_helpers import attached, kv_bytes, make_tiny, prose_ids, random_ids

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def storage_bytes(cache) -> int:
    """Bytes of the storage behind every layer's keys and values (catches views into a larger buffer)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.untyped_storage().nbytes()
    return total


@pytest.fixture(scope="module")
def model():
    return make_tiny(seed=8)


@pytest.mark.parametrize("method", ["streaming_llm", "h2o", "snapkv"])
def test_kv_bytes_proportional_to_budget_not_context(model, method):
    measured = {}
    for context in (256, 1024):
        for budget in (32, 64):
            ids = random_ids(context, batch=2, seed=context)
            with attached(model, method, budget=budget, sink_tokens=4, recent_window=8, chunk_size=128) as m:
                out = m.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            cache = out.cache
            expected = kv_bytes(LAYERS, 2, KV_HEADS, budget, HEAD_DIM, element_size=4)
            assert cache.nbytes()["kv"] == expected, (context, budget)
            assert storage_bytes(cache) == expected, (context, budget)  # physically compacted
            assert cache.tokens_seen == context + 2
            assert cache.stats()["kept_per_layer_head"] == [[[budget] * KV_HEADS] * 2] * LAYERS
            # bookkeeping is per kept entry as well: int64 position + fp32 score, no validity mask
            assert cache.nbytes()["meta"] == LAYERS * 2 * KV_HEADS * budget * (8 + 4)
            measured[context, budget] = cache.nbytes()["kv"]
    assert measured[256, 32] == measured[1024, 32]
    assert measured[256, 64] == measured[1024, 64] == 2 * measured[256, 32]


def test_cache_never_exceeds_budget_plus_one_chunk(model, monkeypatch):
    """During chunked prefill the cache holds at most budget + chunk entries, and exactly the budget after
    every forward (eviction runs after each chunk and each decoding step)."""
    from trainkv.cache import EvictingLayer

    budget, chunk = 40, 64
    held, peak = [], []
    evict = EvictingLayer.evict

    def spy(self, *args, **kwargs):
        peak.append(self.keys.shape[-2])
        return evict(self, *args, **kwargs)

    monkeypatch.setattr(EvictingLayer, "evict", spy)

    def after_forward(module, args, kwargs, output):
        cache = kwargs.get("cache")
        held.append(max(layer.keys.shape[-2] for layer in cache.layers))

    handle = model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        with attached(model, "tova", budget=budget, sink_tokens=4, recent_window=8, chunk_size=chunk) as m:
            m.generate(random_ids(1024, seed=1), max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert len(held) == 1024 // chunk + 3
    assert held == [budget] * len(held)
    assert max(peak) == budget + chunk and len(peak) == LAYERS * len(held)


def test_ratio_budget_grows_with_context(model):
    """A float budget is a keep ratio: bytes scale with the context (documented contrast to an int budget)."""
    sizes = []
    for context in (256, 1024):
        with attached(model, "streaming_llm", budget=0.125, sink_tokens=4, recent_window=8, chunk_size=256) as m:
            out = m.generate(random_ids(context, seed=2), max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        sizes.append(out.cache.nbytes()["kv"])
    assert sizes == [kv_bytes(LAYERS, 1, KV_HEADS, 32, HEAD_DIM), kv_bytes(LAYERS, 1, KV_HEADS, 128, HEAD_DIM)]


@pytest.mark.integration
def test_smollm_kv_bytes_independent_of_context(smollm):
    model, tok = smollm
    cfg = model.config
    for context in (128, 300):
        ids = prose_ids(tok, context, offset=12000)
        with attached(model, "snapkv", budget=48, sink_tokens=4, recent_window=16, chunk_size=128) as m:
            out = m.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        expected = kv_bytes(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 48, cfg.head_dim, element_size=4)
        assert out.cache.nbytes()["kv"] == expected == 2 * 30 * 3 * 48 * 64 * 4
        assert storage_bytes(out.cache) == expected
        assert out.cache.tokens_seen == context + 1
