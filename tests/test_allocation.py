"""Budget allocators (issue 6): every allocation sums exactly to the total and respects the per-head
floor; the runtime keeps exactly the allocation per (layer, head); per-layer memory follows it (heads
of a layer are padded to the largest, so bytes follow the layer's largest head); Ada-KV's adaptive
split keeps each layer's total with every head at or above its floor. CPU, tiny random Llamas."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import trainkv
from runtime_helpers import attached, left_pad, make_tiny, random_ids
from trainkv.budgets import (
    ScoreProfile, adaptive_head_counts, allocate, check_allocation, eviction_overrides, greedy_counts, layer_bytes,
    pyramid, round_to_total, water_fill, weighted, xkv,
)
from trainkv.eval.allocation import profile_scores

LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16


def random_profile(num_layers: int, num_heads: int, samples: int = 3, length: int = 200, seed: int = 0) -> ScoreProfile:
    g = torch.Generator().manual_seed(seed)
    gains, heads = [], []
    for _ in range(samples):
        sg, sh = [], []
        for layer in range(num_layers):
            sharp = 0.2 + 3.0 * torch.rand((), generator=g)  # some layers concentrated, some flat
            imp = torch.rand((num_heads, length), generator=g) ** (1 + 6 * sharp)
            srt = imp.sort(dim=-1, descending=True).values
            sh.append(srt)
            sg.append(srt.sum(0) / srt.sum())
        gains.append(sg)
        heads.append(sh)
    return ScoreProfile(gains, heads, method="test", transform="identity", context_tokens=[length] * samples)


# --- the allocators -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["uniform", "pyramid", "xkv", "adakv", "weighted"])
def test_every_allocation_sums_to_the_total_and_respects_floors(name):
    rng = random.Random(0)
    cases = 0
    for num_layers, num_heads in [(1, 1), (2, 2), (7, 3), (30, 3), (32, 8)]:
        profile = random_profile(num_layers, num_heads, seed=num_layers)
        for total, floor in [(8, 0), (36, 36), (40, 36), (64, 20), (128, 36), (129, 36), (1000, 5)]:
            weights = [[rng.random() ** 3 for _ in range(num_heads)] for _ in range(num_layers)]
            weights[0][0] = 0.0  # a zero weight gets the floor
            budgets = allocate(name, total, num_layers, num_heads, scores=profile, floor=floor, weights=weights)
            assert len(budgets) == num_layers and all(len(r) == num_heads for r in budgets)
            assert all(isinstance(b, int) for r in budgets for b in r)
            check_allocation(budgets, total, floor)  # exact total, every entry >= floor
            cases += 1
    assert cases == 35


def test_pyramid_decays_linearly_like_pyramidkv():
    b = pyramid(128, 30, 3, floor=36)
    per_layer = [r[0] for r in b]
    assert all(r == [r[0]] * 3 for r in b)  # one budget per layer
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
    base = 128 - 36
    k_min, k_max = base / 20, 2 * base - base / 20
    assert abs(per_layer[0] - (36 + k_max)) <= 1 and abs(per_layer[-1] - (36 + k_min)) <= 1
    steps = [a - b for a, b in zip(per_layer, per_layer[1:])]
    assert max(steps) - min(steps) <= 1  # arithmetic (up to rounding)
    assert pyramid(128, 1, 3, floor=36) == [[128] * 3]
    # a cap (the context) clips the top layer and lifts the bottom, keeping the total
    capped = pyramid(128, 30, 3, floor=36, cap=150)
    check_allocation(capped, 128, 36)
    assert max(r[0] for r in capped) <= 150


def test_weighted_is_proportional_with_water_filled_floors():
    w = [[1.0, 2.0], [3.0, 4.0]]
    b = weighted(w, 100, floor=0)
    assert b == [[40, 80], [120, 160]]
    b = weighted([[0.0, 1.0], [1.0, 1.0]], 50, floor=20)  # zero weight pinned at the floor, rest proportional
    assert b[0][0] == 20 and sorted([b[0][1], b[1][0], b[1][1]]) == [60, 60, 60]
    shares = water_fill([1, 1, 10], 30, floor=5, cap=12)
    assert shares == pytest.approx([9.0, 9.0, 12.0])
    assert round_to_total([1.5, 1.5, 1.0], 4) in ([2, 1, 1], [1, 2, 1])
    with pytest.raises(ValueError, match="floor"):
        weighted(w, 10, floor=20)


def test_xkv_greedy_is_the_exact_optimum_of_the_separable_problem():
    g = torch.Generator().manual_seed(4)
    for trial in range(20):
        num_layers, length = 3, 6
        gains = [torch.rand(length, generator=g).sort(descending=True).values for _ in range(num_layers)]
        slots = int(torch.randint(0, num_layers * length + 1, (1,), generator=g))
        counts = greedy_counts(gains, slots)
        assert sum(counts) == slots
        best = max(
            (c for c in itertools.product(range(length + 1), repeat=num_layers) if sum(c) == slots),
            key=lambda c: sum(float(gains[i][:c[i]].sum()) for i in range(num_layers)),
        )
        got = sum(float(gains[i][:counts[i]].sum()) for i in range(num_layers))
        want = sum(float(gains[i][:best[i]].sum()) for i in range(num_layers))
        assert got == pytest.approx(want, abs=1e-6), (trial, counts, best)


def test_xkv_gives_flat_layers_more_than_concentrated_ones():
    length = 100
    peaked = torch.zeros(2, length)
    peaked[:, :5] = 1.0  # all of the layer's importance in 5 tokens
    flat = torch.ones(2, length)
    heads = [peaked, flat]
    gains = [h.sum(0) / h.sum() for h in heads]
    profile = ScoreProfile([gains], [heads])
    b = xkv(profile, 40, 2, 2, floor=10)
    check_allocation(b, 40, 10)
    assert b[0][0] < b[1][0]
    assert b[0][0] >= 10 + 5  # the peaked layer still gets its 5 important tokens
    assert profile.retained(b, floor=10) > profile.retained(allocate("uniform", 40, 2, 2), floor=10) - 1e-9


def test_eviction_config_allocation_weights_and_validation():
    w = [[1.0, 3.0], [2.0, 2.0], [0.5, 0.5], [1.0, 1.0]]
    cfg = trainkv.EvictionConfig(budget=64, sink_tokens=4, recent_window=8, allocation_weights=w)
    rows = [cfg.budget_for(i, 2, 1000) for i in range(4)]
    assert rows == weighted(w, 64, 12)
    check_allocation(rows, 64, 12)
    ratio = cfg.replace(budget=0.125)  # a keep ratio: the mean budget per head follows the tokens seen
    check_allocation([ratio.budget_for(i, 2, 800) for i in range(4)], 100, 12)
    with pytest.raises(ValueError, match="allocation_weights"):
        trainkv.EvictionConfig(allocation_weights=[[0.0, 0.0]])
    with pytest.raises(ValueError, match="head_allocation"):
        trainkv.EvictionConfig(head_allocation="greedy")
    with pytest.raises(ValueError, match="mode='budget'"):
        trainkv.EvictionConfig(head_allocation="adaptive", mode="threshold")
    assert eviction_overrides("adakv", [[40, 40]], 0.3) == {"head_budgets": [[40, 40]], "head_allocation": "adaptive",
                                                             "adaptive_floor": 0.3}


# --- the runtime follows the allocation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return make_tiny(seed=8, sharp=3.0, num_hidden_layers=LAYERS)


def _prefill(model, ids, mask=None, **eviction):
    """Chunked prefill through generate (one new token), returning the cache."""
    with attached(model, eviction.pop("method", "snapkv"), **eviction) as m:
        out = m.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    return out.cache


@pytest.mark.parametrize("name", ["uniform", "pyramid", "xkv", "weighted"])
def test_runtime_keeps_the_allocation_and_layer_bytes_follow_it(model, name):
    mean, floor = 48, 12
    profile = random_profile(LAYERS, KV_HEADS, seed=1)
    weights = [[1.0, 4.0], [2.0, 1.0], [0.2, 0.2], [1.0, 3.0]]  # per-head: ragged inside layers
    budgets = allocate(name, mean, LAYERS, KV_HEADS, scores=profile, floor=floor, weights=weights)
    check_allocation(budgets, mean, floor)
    cache = _prefill(model, random_ids(300, batch=2, seed=5), budget=mean, sink_tokens=4, recent_window=8,
                     chunk_size=64, head_budgets=budgets)
    kept = cache.stats()["kept_per_layer_head"]  # [L][B][H], after the last eviction (decode step included)
    assert kept == [[row, row] for row in budgets]
    assert sum(sum(r) for r in budgets) == mean * LAYERS * KV_HEADS
    for i, layer in enumerate(cache.layers):
        # storage is [B, H, max_h budget, D]: exact for per-layer allocations, padded for ragged heads
        assert layer.nbytes()["kv"] == layer_bytes([budgets[i]], 2, HEAD_DIM, 4)[0] == \
            2 * 2 * KV_HEADS * max(budgets[i]) * HEAD_DIM * 4
        assert layer.keys.untyped_storage().nbytes() * 2 == layer.nbytes()["kv"]
    if name in ("uniform", "pyramid", "xkv"):  # per-layer allocations: bytes are exactly the allocation
        assert cache.nbytes()["kv"] == sum(2 * 2 * sum(r) * HEAD_DIM * 4 for r in budgets)


def test_runtime_allocation_weights_at_any_budget(model):
    weights = [[1.0, 1.0], [3.0, 3.0], [0.5, 0.5], [2.0, 2.0]]
    for mean in (32, 64):
        cache = _prefill(model, random_ids(400, seed=2), budget=mean, sink_tokens=4, recent_window=8, chunk_size=64,
                         allocation_weights=weights)
        kept = [layer[0] for layer in cache.stats()["kept_per_layer_head"]]
        assert kept == weighted(weights, mean, 12)
        assert [layer.nbytes()["kv"] for layer in cache.layers] == layer_bytes(kept, 1, HEAD_DIM, 4)


def test_a_layer_share_beyond_the_horizon_goes_to_the_other_layers(model):
    """Learned weights that give one layer more entries than the sequence has (Qwen's layer budgets: layer 0 weighs
    0.94 against <= 0.13): with the horizon known (generate, the eval runners), that layer is capped at it and the
    rest goes to the other layers, so the cache holds the whole budget; without it the excess stays empty."""
    weights = [[12.0, 12.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    mean, floor, prompt, new = 48, 12, 100, 1
    cfg = trainkv.EvictionConfig(budget=mean, sink_tokens=4, recent_window=8, allocation_weights=weights)
    uncapped = [cfg.budget_for(i, KV_HEADS, prompt) for i in range(LAYERS)]
    assert uncapped[0][0] > prompt + new  # the overflow this test is about
    capped = [cfg.budget_for(i, KV_HEADS, prompt, horizon=prompt + new) for i in range(LAYERS)]
    check_allocation(capped, mean, floor)
    assert capped[0] == [prompt + new] * KV_HEADS and all(capped[i][0] > uncapped[i][0] for i in range(1, LAYERS))
    assert cfg.budget_for(0, KV_HEADS, prompt, horizon=10) == [mean] * KV_HEADS  # horizon < mean: cap at the mean
    # the runtime: generate knows the horizon (prompt + max_new_tokens)
    cache = _prefill(model, random_ids(prompt, seed=3), budget=mean, sink_tokens=4, recent_window=8, chunk_size=32,
                     allocation_weights=weights)
    kept = [layer[0] for layer in cache.stats()["kept_per_layer_head"]]
    assert kept[0] == [prompt] * KV_HEADS and kept[1:] == capped[1:]  # the last new token is never fed back
    assert sum(map(sum, kept)) == mean * LAYERS * KV_HEADS - new * KV_HEADS  # all but the horizon's slack
    # a bare cache that does not know the horizon keeps today's behaviour: layer 0 holds every token, the rest of
    # its share stays empty, the other layers keep their uncapped shares
    with attached(model, "snapkv", budget=mean, sink_tokens=4, recent_window=8, chunk_size=32,
                  allocation_weights=weights) as m:
        bare = m.new_cache()
        m(input_ids=random_ids(prompt, seed=3), cache=bare)
    kept = [layer[0] for layer in bare.stats()["kept_per_layer_head"]]
    assert kept[0] == [prompt] * KV_HEADS and kept[1:] == uncapped[1:]
    assert sum(map(sum, kept)) < mean * LAYERS * KV_HEADS


# --- Ada-KV --------------------------------------------------------------------------------------------


def _filled_layer(scores: torch.Tensor, valid: torch.Tensor | None = None):
    """An EvictingLayer holding ``scores`` ``[B, H, L]`` at positions 0..L-1 (keys random)."""
    b, h, length = scores.shape
    cache = trainkv.EvictingCache(1, trainkv.EvictionConfig(budget=length, sink_tokens=0, recent_window=0))
    cache.pending_valid = None
    layer = cache.layers[0]
    k = torch.randn(b, h, length, 4)
    layer.update(k, k.clone())
    layer.scores = scores.clone()
    if valid is not None:
        layer.valid = valid
    return layer


def test_adaptive_counts_are_the_joint_top_k_with_a_floor():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        b, h, length = 2, 3, 40
        scale = torch.tensor([0.1, 1.0, 5.0])[None, :, None]  # heads of very different score scales
        scores = torch.rand((b, h, length), generator=g) * scale
        layer = _filled_layer(scores)
        per_head = int(torch.randint(4, 20, (1,), generator=g))
        alpha = [0.0, 0.2, 0.5, 1.0][trial % 4]
        cfg = trainkv.EvictionConfig(budget=per_head, sink_tokens=0, recent_window=0, head_allocation="adaptive",
                                     adaptive_floor=alpha)
        counts = adaptive_head_counts(layer, torch.tensor([per_head] * h), cfg)
        total, floor = per_head * h, math.ceil(alpha * per_head)
        assert counts.shape == (b, h)
        assert (counts.sum(-1) <= total + h).all() and (counts >= floor).all()
        if alpha < 1.0:
            assert (counts.sum(-1) == total).all()
        for row in range(b):  # brute force: floors first, then the best remaining scores of all heads
            chosen = torch.zeros(h, length, dtype=torch.bool)
            for head in range(h):
                chosen[head, scores[row, head].topk(floor).indices] = True
            rest = scores[row].masked_fill(chosen, float("-inf")).flatten().topk(total - int(chosen.sum())).indices
            chosen.view(-1)[rest] = True
            assert counts[row].tolist() == chosen.sum(-1).tolist(), (trial, alpha)
        if alpha == 0.0:  # no safeguard: the high-scale head takes (almost) everything
            assert counts[:, 2].min() > counts[:, 0].max()


def test_adaptive_runtime_keeps_layer_totals_and_head_floors(model):
    mean, sinks, window, alpha = 40, 4, 8, 0.2
    budgets = pyramid(mean, LAYERS, KV_HEADS, floor=sinks + window)
    ids_a, ids_b = random_ids(310, seed=11)[0], random_ids(260, seed=12)[0]
    ids, mask = left_pad([ids_a, ids_b])
    for method in ("snapkv", "h2o", "corm"):  # not tova: its all-head average gives every head the same scores
        cache = _prefill(model, ids, mask, method=method, budget=mean, sink_tokens=sinks, recent_window=window,
                         chunk_size=64, **eviction_overrides("adakv", budgets, alpha))
        kept = cache.stats()["kept_per_layer_head"]
        floor = max(sinks + window, math.ceil(alpha * mean))
        ragged = False
        for i, layer_rows in enumerate(kept):
            for row in layer_rows:
                assert sum(row) == sum(budgets[i]), (method, i, row)  # the layer's total is kept
                assert min(row) >= floor, (method, i, row)  # every head keeps its floor
                ragged |= len(set(row)) > 1
            layer = cache.layers[i]
            assert layer.nbytes()["kv"] == 2 * 2 * KV_HEADS * int(layer.kept_counts().max()) * HEAD_DIM * 4
        assert ragged, method  # the split really adapts to the scores


def test_adaptive_with_uniform_scores_matches_fixed_budgets(model):
    """StreamingLLM scores every evictable token alike: the joint top-k then has no reason to move budget."""
    ids = random_ids(300, seed=3)
    settings = dict(method="streaming_llm", budget=40, sink_tokens=4, recent_window=8, chunk_size=64)
    fixed = _prefill(model, ids, **settings)
    adaptive = _prefill(model, ids, **settings, **eviction_overrides("adakv", [[40, 40]] * LAYERS))
    assert [layer[0] for layer in adaptive.stats()["kept_per_layer_head"]] == [[40, 40]] * LAYERS
    for a, f in zip(adaptive.layers, fixed.layers):
        assert torch.equal(a.positions, f.positions)


# --- profiling for xkv ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["snapkv", "attention_gate"])
def test_profile_scores_and_xkv_from_a_model(model, method):
    contexts = [random_ids(n, seed=n)[0].tolist() for n in (150, 200)]
    trainkv.attach(model, method, trainkv.EvictionConfig(budget=64, sink_tokens=4, recent_window=8))
    try:
        profile = profile_scores(model, contexts, sink_tokens=4, recent_window=8)
    finally:
        trainkv.detach(model)
    assert profile.transform == ("sigmoid" if method == "attention_gate" else "identity")
    assert profile.num_layers == LAYERS and len(profile.layer_gains) == 2
    for sample, n in zip(profile.layer_gains, (150, 200)):
        for gains in sample:
            assert gains.numel() == n - 4 - 8
            assert (gains[1:] <= gains[:-1] + 1e-7).all() and float(gains.sum()) == pytest.approx(1.0, abs=1e-4)
    budgets = xkv(profile, 40, LAYERS, KV_HEADS, floor=12)
    check_allocation(budgets, 40, 12)
