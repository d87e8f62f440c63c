"""Invariants 1 and 2: nothing evicted => plain transformers' outputs; chunked prefill == one-shot prefill.

Invariant 1: with a budget at or above the context, trainkv's logits and greedy generations equal the
plain transformers model's (fp32, max abs diff < 1e-4), for every training-free method, chunked or
not, and for a left-padded batch (each row against its unpadded single-row reference).
Invariant 2: feeding the prompt to an `EvictingCache` chunk by chunk gives the logits of one forward.
"""

from __future__ import annotations

import pytest
import torch

import trainkv
from runtime_helpers import TOL, attached, greedy, left_pad, max_diff, prose_ids, random_ids

METHODS = list(trainkv.TRAINING_FREE)
NO_EVICT = dict(budget=4096, sink_tokens=2, recent_window=4)  # far above every context used here


# ---------------------------------------------------------------------------------------------------------
# invariant 1 -- tiny random Llama (GQA 4 q heads / 2 kv heads)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_forward_logits_equal_plain(tiny, method):
    ids = random_ids(40)
    with torch.no_grad():
        ref = tiny(ids).logits
        with attached(tiny, method, chunk_size=16, **NO_EVICT) as model:
            one_shot = model(ids, cache=model.new_cache()).logits
            cache = model.new_cache()
            chunked = torch.cat([model(ids[:, i:i + 7], cache=cache).logits for i in range(0, 40, 7)], dim=1)
    assert max_diff(one_shot, ref) < TOL
    assert max_diff(chunked, ref) < TOL
    assert cache.tokens_seen == 40
    assert cache.stats()["kept_per_layer_head"] == [[[40, 40]]] * 2  # nothing was evicted


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_greedy_generation_equals_plain(tiny, method, chunk_size):
    ids = random_ids(37, seed=3)
    ref_tokens, ref_logits, _ = greedy(tiny, ids, new=8)
    with attached(tiny, method, chunk_size=chunk_size, **NO_EVICT) as model:
        tokens, logits, out = greedy(model, ids, new=8)
    assert torch.equal(tokens, ref_tokens)
    assert max_diff(logits, ref_logits) < TOL
    assert isinstance(out.cache, trainkv.EvictingCache)
    assert out.cache.tokens_seen == 37 + 8 - 1


def test_ratio_budget_one_equals_plain(tiny):
    ids = random_ids(30, seed=4)
    ref_tokens, ref_logits, _ = greedy(tiny, ids, new=5)
    with attached(tiny, "h2o", budget=1.0, sink_tokens=2, recent_window=4, chunk_size=8) as model:
        tokens, logits, _ = greedy(model, ids, new=5)
    assert torch.equal(tokens, ref_tokens)
    assert max_diff(logits, ref_logits) < TOL


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_equals_each_unpadded_row(tiny, method):
    rows = [random_ids(n, seed=10 + n)[0] for n in (29, 21, 9)]
    ids, mask = left_pad(rows)
    refs = [greedy(tiny, r[None], new=6) for r in rows]
    plain_tokens, plain_logits, _ = greedy(tiny, ids, mask, new=6)
    with attached(tiny, method, chunk_size=8, **NO_EVICT) as model:
        tokens, logits, out = greedy(model, ids, mask, new=6)
    for i, (ref_tokens, ref_logits, _) in enumerate(refs):
        assert torch.equal(tokens[i], ref_tokens[0]), f"row {i}"
        assert max_diff(logits[i], ref_logits[0]) < TOL, f"row {i}"
    # and the batched plain model agrees as well (sanity of the reference)
    assert torch.equal(tokens, plain_tokens)
    assert max_diff(logits, plain_logits) < TOL
    # padding is held as invalid entries, not as kept tokens
    kept = out.cache.stats()["kept_per_layer_head"][0]
    assert kept == [[29 + 5] * 2, [21 + 5] * 2, [9 + 5] * 2]


def test_padded_forward_logits_equal_unpadded_rows(tiny):
    """A plain forward with an EvictingCache, padded batch, explicit positions: each row equals its own run."""
    rows = [random_ids(n, seed=20 + n)[0] for n in (24, 11)]
    ids, mask = left_pad(rows)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        refs = [tiny(r[None]).logits[0] for r in rows]
        with attached(tiny, "snapkv", chunk_size=8, **NO_EVICT) as model:
            cache = model.new_cache()
            logits = torch.cat([
                model(ids[:, i:i + 5], attention_mask=mask[:, :i + 5], position_ids=pos[:, i:i + 5], cache=cache).logits
                for i in range(0, ids.shape[1], 5)
            ], dim=1)
    for i, (r, ref) in enumerate(zip(rows, refs)):
        assert max_diff(logits[i, ids.shape[1] - len(r):], ref) < TOL, f"row {i}"


# ---------------------------------------------------------------------------------------------------------
# invariant 2 -- chunked prefill without eviction == one-shot prefill
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_forward_equals_one_shot(tiny, chunk):
    ids = random_ids(33, seed=5)
    with torch.no_grad(), attached(tiny, "h2o", **NO_EVICT) as model:
        one = model.new_cache()
        ref = model(ids, cache=one).logits
        many = model.new_cache()
        logits = torch.cat([model(ids[:, i:i + chunk], cache=many).logits for i in range(0, 33, chunk)], dim=1)
    assert max_diff(logits, ref) < 1e-5
    for a, b in zip(one.layers, many.layers):
        assert torch.equal(a.positions, b.positions)
        assert max_diff(a.keys, b.keys) < 1e-5 and max_diff(a.values, b.values) < 1e-5
        assert torch.allclose(a.scores, b.scores, atol=1e-5)  # H2O's accumulated attention, too


def test_generate_chunk_sizes_agree(tiny):
    ids = random_ids(45, seed=6)
    runs = []
    with attached(tiny, "tova", **NO_EVICT) as model:
        for chunk in (1, 4, 16, 45, 512):
            runs.append(greedy(model, ids, new=6, eviction=dict(chunk_size=chunk))[:2])
        # prefill_chunk_size given directly to generate also works
        runs.append(greedy(model, ids, new=6, prefill_chunk_size=9)[:2])
    for tokens, logits in runs[1:]:
        assert torch.equal(tokens, runs[0][0])
        assert max_diff(logits, runs[0][1]) < 1e-5


def test_generate_chunk_sizes_agree_padded(tiny):
    rows = [random_ids(n, seed=30 + n)[0] for n in (26, 13)]
    ids, mask = left_pad(rows)
    with attached(tiny, "corm", **NO_EVICT) as model:
        a = greedy(model, ids, mask, new=5, eviction=dict(chunk_size=3))
        b = greedy(model, ids, mask, new=5, eviction=dict(chunk_size=100))
    assert torch.equal(a[0], b[0])
    assert max_diff(a[1], b[1]) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# invariant 1 -- SmolLM2-135M-Instruct (integration)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm_forward_logits_equal_plain(smollm):
    model, tok = smollm
    ids = prose_ids(tok, 200)
    with torch.no_grad():
        ref = model(ids).logits
        with attached(model, "snapkv", budget=256, chunk_size=64):
            one_shot = model(ids, cache=model.new_cache()).logits
            cache = model.new_cache()
            chunked = torch.cat([model(ids[:, i:i + 64], cache=cache).logits for i in range(0, 200, 64)], dim=1)
    assert max_diff(one_shot, ref) < TOL
    assert max_diff(chunked, ref) < TOL  # invariant 2 on the real model too


@pytest.mark.integration
def test_smollm_greedy_equals_plain_every_method(smollm):
    model, tok = smollm
    ids = prose_ids(tok, 120, offset=3000)
    ref_tokens, ref_logits, _ = greedy(model, ids, new=5)
    for method in METHODS:
        with attached(model, method, budget=128, chunk_size=48):
            tokens, logits, _ = greedy(model, ids, new=5)
        assert torch.equal(tokens, ref_tokens), method
        assert max_diff(logits, ref_logits) < TOL, method


@pytest.mark.integration
def test_smollm_left_padded_batch_equals_rows(smollm):
    model, tok = smollm
    rows = [prose_ids(tok, 90, offset=6000)[0], prose_ids(tok, 41, offset=9000)[0]]
    ids, mask = left_pad(rows, pad=tok.pad_token_id)
    refs = [greedy(model, r[None], new=4) for r in rows]
    with attached(model, "h2o", budget=128, chunk_size=32):
        tokens, logits, _ = greedy(model, ids, mask, new=4)
    for i, (ref_tokens, ref_logits, _) in enumerate(refs):
        assert torch.equal(tokens[i], ref_tokens[0]), f"row {i}"
        assert max_diff(logits[i], ref_logits[0]) < TOL, f"row {i}"
