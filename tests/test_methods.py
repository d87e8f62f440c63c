"""Each training-free method keeps what its paper says it keeps.

References are brute force: plain matmul/softmax over the plain model's own post-RoPE queries and keys
(captured with a recording attention function, see runtime_helpers.capture_qk). With one prefill chunk
every layer attended over the whole prompt before evicting, so every layer's scores can be recomputed
from the plain model.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import trainkv
from runtime_helpers import (
    assert_kept_topk, attached, brute_probs, capture_qk, greedy, left_pad, make_tiny, max_diff, random_ids,
    row_head_entries,
)

L, BUDGET, SINK, RECENT, WINDOW = 48, 20, 2, 4, 8
SCALING = 16 ** -0.5


def one_shot(model, method, ids=None, mask=None, **overrides):
    """Prefill ``ids`` in one chunk with eviction to BUDGET; return (plain q/k per layer, cache)."""
    ids = random_ids(L, seed=21) if ids is None else ids
    plain = capture_qk(model, ids)
    settings = dict(budget=BUDGET, sink_tokens=SINK, recent_window=RECENT, chunk_size=4096)
    settings.update(overrides)
    method_cfg = {"window_size": WINDOW} if method in ("snapkv", "corm") else {}
    trainkv.attach(model, method, trainkv.EvictionConfig(**settings), **method_cfg)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    finally:
        trainkv.detach(model)
    return plain, out.cache


def probs_of(plain_layer, queries: slice, length: int = L):
    q, k = plain_layer
    pos = torch.arange(length)
    return brute_probs(q[0, :, queries], k[0], SCALING, pos[queries], pos)  # [Hkv, g, n, L]


def check_layer(layer, ref_scores: torch.Tensor, budget: int = BUDGET, tol: float = 1e-5):
    """Kept set = protected + top-scored by ``ref_scores`` [Hkv, L]; stored scores equal the reference."""
    assert layer.kept_counts().tolist() == [[budget] * ref_scores.shape[0]]
    for h in range(ref_scores.shape[0]):
        pos, scores, _ = row_head_entries(layer, 0, h)
        assert_kept_topk(set(pos), range(ref_scores.shape[1]), ref_scores[h].tolist(), budget, SINK, RECENT, tol)
        assert torch.allclose(torch.tensor(scores, dtype=torch.float64), ref_scores[h, pos], atol=tol), h


@pytest.fixture(scope="module")
def model():
    return make_tiny(seed=1, sharp=6.0)  # peaked attention: clear rankings


def test_streaming_llm_keeps_sinks_and_most_recent(model):
    _, cache = one_shot(model, "streaming_llm")
    for layer in cache.layers:
        for h in range(2):
            assert layer.positions[0, h].tolist() == [0, 1] + list(range(L - (BUDGET - SINK), L))
    # and while decoding: the window slides, the sinks stay
    with attached(model, "streaming_llm", budget=10, sink_tokens=3, recent_window=2, chunk_size=16):
        _, _, out = greedy(model, random_ids(30, seed=2), new=9)
    assert out.cache.layers[1].positions[0, 1].tolist() == [0, 1, 2] + list(range(31, 38))


def test_h2o_scores_are_accumulated_attention(model):
    """No eviction, chunked prefill and decoding: every entry's score is the attention it received from all
    queries so far (summed over the query heads of its KV group)."""
    ids = random_ids(30, seed=22)
    with attached(model, "h2o", budget=512, sink_tokens=SINK, recent_window=RECENT, chunk_size=7):
        _, _, out = greedy(model, ids, new=6)
    fed = out.sequences[:, :-1]  # the last generated token was never fed back
    n = fed.shape[1]
    plain = capture_qk(model, fed)
    for layer, (q, k) in zip(out.cache.layers, plain):
        pos = torch.arange(n)
        ref = brute_probs(q[0], k[0], SCALING, pos, pos).sum(dim=(1, 2))  # [Hkv, n]
        assert max_diff(layer.scores[0], ref) < 1e-4
        assert torch.equal(layer.positions[0, 0], pos)


def test_h2o_evicts_lowest_accumulated_attention(model):
    plain, cache = one_shot(model, "h2o")
    for layer, pl in zip(cache.layers, plain):
        check_layer(layer, probs_of(pl, slice(0, L)).sum(dim=(1, 2)))


def test_tova_scores_are_last_query_attention(model):
    plain, cache = one_shot(model, "tova")
    for layer, pl in zip(cache.layers, plain):
        ref = probs_of(pl, slice(L - 1, L)).mean(dim=(0, 1))[0]  # all query heads, as the paper and kvpress
        check_layer(layer, ref.expand(layer.keys.shape[1], -1))


def snapkv_reference(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over the window queries and the group, then a centred average pool that ignores the padding."""
    scores = probs.mean(dim=(1, 2))  # [Hkv, L]
    half = kernel // 2
    out = torch.empty_like(scores)
    for j in range(scores.shape[1]):
        out[:, j] = scores[:, max(0, j - half): j + half + 1].mean(dim=1)
    return out


def test_snapkv_scores_are_pooled_window_attention(model):
    plain, cache = one_shot(model, "snapkv")
    for layer, pl in zip(cache.layers, plain):
        check_layer(layer, snapkv_reference(probs_of(pl, slice(L - WINDOW, L)), kernel=5))


def test_snapkv_window_spans_prefill_chunks(model):
    """Chunks of 16 over 48 tokens with budget 44: the only eviction happens after the last chunk, and the
    observation window (the last 12 queries) reaches back into the previous chunk."""
    ids = random_ids(L, seed=21)
    plain = capture_qk(model, ids)
    trainkv.attach(model, "snapkv", trainkv.EvictionConfig(budget=44, sink_tokens=SINK, recent_window=RECENT,
                                                           chunk_size=16), window_size=12)
    try:
        out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    finally:
        trainkv.detach(model)
    for layer, pl in zip(out.cache.layers, plain):
        check_layer(layer, snapkv_reference(probs_of(pl, slice(L - 12, L)), kernel=5), budget=44)


def test_corm_scores_are_max_recent_attention(model):
    plain, cache = one_shot(model, "corm")
    for layer, pl in zip(cache.layers, plain):
        ref = probs_of(pl, slice(L - WINDOW, L)).amax(dim=(1, 2)) * L  # normalised by 1/t, t = tokens seen
        check_layer(layer, ref, tol=1e-4)


def test_corm_threshold_mode_is_corms_rule():
    """threshold=1.0: keep a token iff some recent query gave it attention above 1/t (plus protected)."""
    model = make_tiny(seed=3, sharp=20.0)  # peaked enough that many tokens get less than 1/t
    ids = random_ids(L, seed=21)
    plain = capture_qk(model, ids)
    trainkv.attach(model, "corm", trainkv.EvictionConfig(budget=L, sink_tokens=SINK, recent_window=RECENT,
                                                         mode="threshold", threshold=1.0, chunk_size=4096),
                   window_size=WINDOW)
    try:
        out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    finally:
        trainkv.detach(model)
    for layer, pl in zip(out.cache.layers, plain):
        attn = probs_of(pl, slice(L - WINDOW, L)).amax(dim=(1, 2)) * L  # [Hkv, L], in units of 1/t
        for h in range(2):
            want = {p for p in range(L) if attn[h, p] > 1.0 or p < SINK or p >= L - RECENT}
            got = set(row_head_entries(layer, 0, h)[0])
            assert all(abs(attn[h, p] - 1.0) < 1e-5 for p in got ^ want)  # equal up to a tie at 1/t
            assert SINK + RECENT < len(want) < L - 5  # the rule really kept some and evicted some


def test_random_is_seeded_and_deterministic(model):
    ids = random_ids(L, seed=21)
    runs = {}
    for seed in (0, 0, 1):
        trainkv.attach(model, "random", trainkv.EvictionConfig(budget=BUDGET, sink_tokens=SINK, recent_window=RECENT,
                                                               chunk_size=4096), seed=seed)
        try:
            out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        finally:
            trainkv.detach(model)
        positions = [layer.positions.clone() for layer in out.cache.layers]
        if seed in runs:
            assert all(torch.equal(a, b) for a, b in zip(runs[seed], positions))
        runs[seed] = positions
        # the kept set is the protected tokens + top-k of the seeded uniform scores (per cache layer)
        for i, layer in enumerate(out.cache.layers):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            check_layer(layer, torch.rand((1, 2, L), generator=gen)[0].double())
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))



@pytest.mark.parametrize("method", ["h2o", "tova", "snapkv", "corm"])
def test_left_padding_does_not_change_what_is_kept(model, method):
    """A left-padded row keeps exactly what the same prompt keeps alone (padding queries give no attention)."""
    rows = [random_ids(n, seed=40 + n)[0] for n in (35, 20)]
    ids, mask = left_pad(rows)
    settings = dict(budget=12, sink_tokens=0, recent_window=3)
    _, batched = one_shot(model, method, ids=ids, mask=mask, **settings)
    for i, row in enumerate(rows):
        _, single = one_shot(model, method, ids=row[None], **settings)
        for lb, ls in zip(batched.layers, single.layers):
            for h in range(2):
                pos_b, scores_b, _ = row_head_entries(lb, i, h)
                pos_s, scores_s, _ = row_head_entries(ls, 0, h)
                assert pos_b == pos_s, (method, i, h)
                if method in ("h2o", "tova"):
                    assert max_diff(torch.tensor(scores_b), torch.tensor(scores_s)) < 1e-5


def test_every_training_free_method_is_registered():
    assert set(trainkv.TRAINING_FREE) == {"streaming_llm", "h2o", "snapkv", "tova", "corm", "random"}
    for name in trainkv.TRAINING_FREE:
        cls = trainkv.get_method(name)
        assert cls.config_class.name == name and not cls.trainable
        if name != "random":  # each method's file cites its paper
            assert "arxiv.org" in (importlib.import_module(cls.__module__).__doc__ or ""), name
