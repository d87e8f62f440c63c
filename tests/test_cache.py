"""Invariant 3: after eviction each (layer, head) holds exactly its budget -- the protected tokens plus the
top-scored ones -- and kept entries keep their original positions and (post-RoPE) keys.

Checked directly on an `EvictingLayer` (known scores written in, `evict` called) and end to end through
`generate`, with a test-only random-score method that records each layer's entries and scores right
before the runtime evicts (tests/runtime_helpers.py: `Recorder`).
"""

from __future__ import annotations

import pytest
import torch

import trainkv
from runtime_helpers import (
    attached, capture_qk, expected_kept, left_pad, make_tiny, max_diff, random_ids, row_head_entries,
)
from trainkv.attention import stored_attention

B, H, D = 2, 3, 8


def filled_layer(length: int, batch: int = B, heads: int = H, pad: list[int] | None = None, seed: int = 0,
                 config: trainkv.EvictionConfig | None = None):
    """An EvictingLayer holding ``length`` entries with random keys/values; row i has ``pad[i]`` left pads."""
    gen = torch.Generator().manual_seed(seed)
    cache = trainkv.EvictingCache(1, config or trainkv.EvictionConfig(budget=8, sink_tokens=2, recent_window=3))
    mask = torch.ones((batch, length), dtype=torch.long)
    for i, p in enumerate(pad or []):
        mask[i, :p] = 0
    cache.begin_forward(mask, length)
    keys = torch.randn((batch, heads, length, D), generator=gen)
    values = torch.randn((batch, heads, length, D), generator=gen)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    layer = cache.layers[0]
    layer.update(keys, values, kwargs={"position_ids": pos})
    layer.scores = torch.rand((batch, heads, length), generator=gen)
    return layer, keys, values, mask


def snapshot(layer):
    return {
        (r, h): row_head_entries(layer, r, h)[:2]
        for r in range(layer.keys.shape[0]) for h in range(layer.keys.shape[1])
    }


# ---------------------------------------------------------------------------------------------------------
# direct: known scores written into an EvictingLayer
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,sink,recent", [(8, 2, 3), (5, 0, 5), (6, 6, 0), (12, 1, 1), (20, 2, 3)])
def test_evict_keeps_protected_plus_top_scored(budget, sink, recent):
    length = 16
    layer, keys, values, _ = filled_layer(length, seed=budget)
    before = snapshot(layer)
    layer.evict(torch.full((H,), budget), sink, recent)
    keep = min(budget, length)
    assert layer.keys.shape == (B, H, keep, D)  # physically compacted
    assert layer.valid is None
    for (r, h), (pos, scores) in before.items():
        want = expected_kept(pos, scores, budget, sink, recent)
        got = layer.positions[r, h].tolist()
        assert set(got) == want, (r, h)
        assert got == sorted(got)  # time order preserved
        # the kept slots hold the original entry (key, value, score) of that position, not re-rotated
        assert torch.equal(layer.keys[r, h], keys[r, h, got])
        assert torch.equal(layer.values[r, h], values[r, h, got])
        assert torch.equal(layer.scores[r, h], torch.tensor(scores)[got])


def test_evict_brute_force_many_random_cases():
    for seed in range(25):
        gen = torch.Generator().manual_seed(seed)
        length = int(torch.randint(5, 40, (1,), generator=gen))
        sink = int(torch.randint(0, 4, (1,), generator=gen))
        recent = int(torch.randint(0, 6, (1,), generator=gen))
        budget = sink + recent + int(torch.randint(0, 10, (1,), generator=gen))
        pads = [int(torch.randint(0, length // 2, (1,), generator=gen)), 0]
        layer, *_ = filled_layer(length, pad=pads, seed=seed)
        before = snapshot(layer)
        layer.evict(torch.full((H,), budget), sink, recent)
        for (r, h), (pos, scores) in before.items():
            got, _, _ = row_head_entries(layer, r, h)
            assert set(got) == expected_kept(pos, scores, budget, sink, recent), (seed, r, h)
            assert len(got) == min(budget, len(pos))


def test_padding_is_invalid_and_dropped_first():
    layer, _, _, mask = filled_layer(12, pad=[5, 0])
    assert layer.kept_counts().tolist() == [[7] * H, [12] * H]
    assert (layer.positions[0, :, :5] == -1).all()  # padding holds no position
    assert layer.positions[0, 0, 5:].tolist() == list(range(7))
    layer.evict(torch.full((H,), 8), 2, 3)
    assert layer.kept_counts().tolist() == [[7] * H, [8] * H]
    assert layer.keys.shape[-2] == 8
    assert not layer.valid[0, :, -1].any() and layer.valid[1].all()  # the short row's spare slot is invalid


def test_per_head_budgets_give_ragged_heads():
    layer, keys, _, _ = filled_layer(20, seed=7)
    before = snapshot(layer)
    budgets = torch.tensor([6, 11, 9])
    layer.evict(budgets, 2, 3)
    assert layer.keys.shape[-2] == 11  # the largest head budget
    assert layer.kept_counts().tolist() == [[6, 11, 9]] * B
    assert layer.valid is not None
    for (r, h), (pos, scores) in before.items():
        got, _, slots = row_head_entries(layer, r, h)
        assert slots.tolist() == list(range(int(budgets[h])))  # valid entries first, padding slots last
        assert set(got) == expected_kept(pos, scores, int(budgets[h]), 2, 3)
        assert torch.equal(layer.keys[r, h, slots], keys[r, h, got])


def test_threshold_mode_keeps_only_above_threshold_plus_protected():
    layer, _, _, _ = filled_layer(30, seed=11)
    before = snapshot(layer)
    layer.evict(torch.full((H,), 25), 2, 3, threshold=0.6)
    for (r, h), (pos, scores) in before.items():
        got, _, _ = row_head_entries(layer, r, h)
        above = {p for p, s in zip(pos, scores) if s > 0.6}
        protected = {0, 1, 27, 28, 29}
        assert len(above | protected) <= 25  # the budget does not bind here
        assert set(got) == above | protected == expected_kept(pos, scores, 25, 2, 3, threshold=0.6)


def test_threshold_mode_capped_by_budget():
    layer, _, _, _ = filled_layer(30, seed=12)
    before = snapshot(layer)
    layer.evict(torch.full((H,), 7), 2, 3, threshold=0.1)  # most entries are above 0.1; the budget caps them
    assert layer.kept_counts().tolist() == [[7] * H] * B
    for (r, h), (pos, scores) in before.items():
        got, _, _ = row_head_entries(layer, r, h)
        assert set(got) == expected_kept(pos, scores, 7, 2, 3, threshold=0.1)


def test_ragged_attention_ignores_invalid_slots():
    """Attention over a ragged layer equals attention over each head's own kept entries; garbage in padding
    slots has no effect."""
    layer, _, _, _ = filled_layer(20, seed=3, heads=2)
    layer.evict(torch.tensor([5, 9]), 1, 2)
    layer.keys = layer.keys.masked_fill(~layer.valid[..., None], 1e4)  # poison the invalid slots
    layer.values = layer.values.masked_fill(~layer.valid[..., None], 1e4)
    layer.owner.begin_forward(None, 1)
    layer.update(torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D), kwargs={"position_ids": torch.full((B, 1), 20)})
    q = torch.randn(B, 4, 1, D)  # 4 query heads over 2 kv heads (GQA)
    out = stored_attention(q, layer, scaling=D ** -0.5)
    for r in range(B):
        for hq in range(4):
            h = hq // 2
            slots = layer.valid[r, h].nonzero().flatten()
            k, v = layer.keys[r, h, slots], layer.values[r, h, slots]
            ref = torch.softmax(q[r, hq, 0] @ k.T * D ** -0.5, -1) @ v
            assert max_diff(out[r, hq, 0], ref) < 1e-5


def test_reorder_and_repeat_interleave_move_every_field():
    layer, *_ = filled_layer(10, pad=[3, 0], seed=2)
    layer.evict(torch.tensor([6, 8, 7]), 1, 2)
    layer.state["queries"] = torch.arange(B)[:, None].float()
    fields = {n: getattr(layer, n).clone() for n in ("keys", "values", "positions", "scores", "valid")}
    layer.batch_repeat_interleave(2)
    for n, t in fields.items():
        assert torch.equal(getattr(layer, n), t.repeat_interleave(2, dim=0)), n
    assert layer.state["queries"].flatten().tolist() == [0, 0, 1, 1]
    layer.reorder_cache(torch.tensor([3, 0, 0, 1]))
    for n, t in fields.items():
        assert torch.equal(getattr(layer, n), t[[1, 0, 0, 0]]), n
    layer.batch_select_indices(torch.tensor([0, 1]))
    assert layer.batch_size == 2 and torch.equal(layer.positions, fields["positions"][[1, 0]])


# ---------------------------------------------------------------------------------------------------------
# end to end: every eviction inside generate, checked against the recorded scores
# ---------------------------------------------------------------------------------------------------------
def check_events(model, budgets_of, sink, recent, threshold=None, final_cache=None):
    """For every recorded step of every layer, the entries that survive equal the brute-force kept set."""
    n_evictions = 0
    for layer_idx, module in enumerate(trainkv.method_modules(model)):
        events = module.events
        for i, ev in enumerate(events):
            if i + 1 < len(events):
                nxt = events[i + 1]
                post_pos = nxt["positions"][..., : -nxt["new_tokens"]]
                post_valid = nxt["valid"][..., : -nxt["new_tokens"]]
            else:
                layer = final_cache.layers[layer_idx]
                post_pos, post_valid = layer.positions, layer.valid_mask()
            b, h, _ = ev["positions"].shape
            for r in range(b):
                for hh in range(h):
                    valid = ev["valid"][r, hh]
                    pos = ev["positions"][r, hh, valid].tolist()
                    scores = ev["scores"][r, hh, valid].tolist()
                    got = post_pos[r, hh, post_valid[r, hh]].tolist()
                    budget = budgets_of(layer_idx, hh, ev["seen"])
                    if ev["will_evict"]:
                        want = expected_kept(pos, scores, budget, sink, recent, threshold)
                    else:
                        want = set(pos)
                        assert len(pos) <= budget, f"layer {layer_idx} head {hh}: {len(pos)} entries > budget {budget}"
                    assert set(got) == want, (layer_idx, i, r, hh)
                    assert got == sorted(got)
            n_evictions += ev["will_evict"]
    return n_evictions


@pytest.mark.parametrize("chunk_size", [64, 10])
def test_generate_evicts_exact_kept_sets(recorder_method, chunk_size):
    model = make_tiny(seed=2)
    ids = random_ids(50, batch=2, seed=8)
    budget, sink, recent = 16, 3, 5
    with attached(model, recorder_method, budget=budget, sink_tokens=sink, recent_window=recent, chunk_size=chunk_size):
        out = model.generate(ids, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
        n = check_events(model, lambda l, h, seen: budget, sink, recent, final_cache=out.cache)
        assert n >= 2 * (1 + 6)  # prefill (every layer) and every decoding step evicted
        stats = out.cache.stats()
    assert stats["tokens_seen"] == 50 + 6
    assert stats["kept_per_layer_head"] == [[[budget] * 2] * 2] * 2  # [layer][row][head]
    # original positions kept; layer-0 keys equal the plain model's post-RoPE keys at those positions
    (_, k0), _ = capture_qk(model, out.sequences[:, :-1])
    layer0 = out.cache.layers[0]
    for r in range(2):
        for h in range(2):
            assert max_diff(layer0.keys[r, h], k0[r, h, layer0.positions[r, h]]) < 1e-5


def test_one_shot_prefill_keys_equal_plain_in_every_layer(recorder_method):
    """With a single prefill chunk every layer saw the full context, so every layer's kept keys must be the
    plain model's keys at the kept positions (no re-rotation)."""
    model = make_tiny(seed=3)
    ids = random_ids(40, seed=9)
    with attached(model, recorder_method, budget=12, sink_tokens=2, recent_window=4, chunk_size=512):
        out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        check_events(model, lambda l, h, seen: 12, 2, 4, final_cache=out.cache)
    plain = capture_qk(model, ids)
    for layer, (_, k) in zip(out.cache.layers, plain):
        assert layer.keys.shape == (1, 2, 12, 16)
        for h in range(2):
            pos = layer.positions[0, h]
            assert pos[:2].tolist() == [0, 1] and pos[-4:].tolist() == [36, 37, 38, 39]
            assert max_diff(layer.keys[0, h], k[0, h, pos]) < 1e-5


def test_generate_left_padded_exact_kept_sets(recorder_method):
    model = make_tiny(seed=4)
    ids, mask = left_pad([random_ids(n, seed=n)[0] for n in (40, 17, 31)])
    with attached(model, recorder_method, budget=14, sink_tokens=2, recent_window=3, chunk_size=9):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        check_events(model, lambda l, h, seen: 14, 2, 3, final_cache=out.cache)
    assert out.cache.stats()["kept_per_layer_head"][0] == [[14, 14]] * 3
    # row 1 (17 real tokens): the sinks are its own first tokens, not padding
    assert out.cache.layers[0].positions[1, 0, :2].tolist() == [0, 1]


@pytest.mark.parametrize("prompt", [12, 40])
def test_generate_per_head_budgets(recorder_method, prompt):
    """head_budgets [[6, 14], [10, 8]]: each head ends with exactly its own budget, also when the context lies
    between the smallest and the largest budget (12 tokens)."""
    head_budgets = [[6, 14], [10, 8]]
    model = make_tiny(seed=5)
    ids = random_ids(prompt, seed=12)
    with attached(model, recorder_method, budget=16, sink_tokens=1, recent_window=2, head_budgets=head_budgets,
                  chunk_size=7):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        check_events(model, lambda l, h, seen: head_budgets[l][h], 1, 2, final_cache=out.cache)
    seen = prompt + 3
    want = [[[min(b, seen) for b in row]] for row in head_budgets]
    assert out.cache.stats()["kept_per_layer_head"] == want
    for layer, row in zip(out.cache.layers, head_budgets):
        assert layer.keys.shape[-2] == min(max(row), seen)
        if min(row) < seen:
            assert layer.valid is not None and layer.valid[0].sum(-1).tolist() == [min(b, seen) for b in row]


def test_generate_threshold_mode(recorder_method):
    model = make_tiny(seed=6)
    ids = random_ids(36, seed=13)
    with attached(model, recorder_method, budget=30, sink_tokens=2, recent_window=3, mode="threshold",
                  threshold=0.7, chunk_size=12):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        n = check_events(model, lambda l, h, seen: 30, 2, 3, threshold=0.7, final_cache=out.cache)
    assert n > 0
    for layer in out.cache.layers:
        for h in range(2):
            pos, scores, _ = row_head_entries(layer, 0, h)
            last = max(pos)
            for p, s in zip(pos, scores):
                assert p < 2 or p > last - 3 or s > 0.7  # unprotected survivors scored above the threshold
        assert (layer.kept_counts() < 39).all()  # it really dropped entries


def test_ratio_budget_tracks_tokens_seen(recorder_method):
    model = make_tiny(seed=7)
    ids = random_ids(60, seed=14)
    with attached(model, recorder_method, budget=0.25, sink_tokens=2, recent_window=4, chunk_size=20):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        check_events(model, lambda l, h, seen: max(6, -(-seen // 4)), 2, 4, final_cache=out.cache)
    assert out.cache.stats()["kept_per_layer_head"][0] == [[16, 16]]  # ceil(0.25 * 62)


def test_stats_report_seen_apart_from_kept(tiny):
    ids = random_ids(48, seed=15)
    with attached(tiny, "streaming_llm", budget=10, sink_tokens=2, recent_window=4, chunk_size=16) as model:
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    stats = out.cache.stats()
    assert stats["tokens_seen"] == 48 + 4 == out.cache.get_seq_length()
    assert stats["kept_per_layer_head"] == [[[10, 10]]] * 2
    assert stats["bytes"] == out.cache.nbytes()
    assert stats["bytes"]["kv"] == 2 * 2 * 1 * 2 * 10 * 16 * 4
    # StreamingLLM: sinks + the most recent positions
    assert out.cache.layers[1].positions[0, 0].tolist() == [0, 1] + list(range(44, 52))
