"""generate() with eviction: beam search and several return sequences work (the cache implements
reorder_cache / batch_repeat_interleave), per-call eviction overrides, and detach restores the plain model."""

from __future__ import annotations

import pytest
import torch

import trainkv
from runtime_helpers import TOL, attached, greedy, left_pad, max_diff, prose_ids, random_ids

NO_EVICT = dict(budget=4096, sink_tokens=2, recent_window=4)


def beam(model, ids, mask=None, **kwargs):
    out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), do_sample=False,
                         return_dict_in_generate=True, output_scores=True, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------------------
# beam search / num_return_sequences
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_beam_search_equals_plain(tiny, method):
    rows = [random_ids(n, seed=50 + n)[0] for n in (25, 14)]
    ids, mask = left_pad(rows)
    ref = beam(tiny, ids, mask, max_new_tokens=7, num_beams=3, num_return_sequences=2)
    with attached(tiny, method, chunk_size=6, **NO_EVICT) as model:
        out = beam(model, ids, mask, max_new_tokens=7, num_beams=3, num_return_sequences=2)
    assert out.sequences.shape == (4, ids.shape[1] + 7)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_diff(out.sequences_scores, ref.sequences_scores) < TOL
    assert isinstance(out.cache, trainkv.EvictingCache)


def test_sampling_with_several_return_sequences_equals_plain(tiny):
    ids = random_ids(20, seed=60)
    torch.manual_seed(123)
    ref = tiny.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=6, top_k=0)
    with attached(tiny, "tova", chunk_size=8, **NO_EVICT) as model:
        torch.manual_seed(123)
        out = model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=6, top_k=0)
    assert out.shape == (3, 26)
    assert torch.equal(out, ref)


def test_beam_search_with_eviction_keeps_budget(tiny):
    ids = random_ids(40, batch=2, seed=61)
    with attached(tiny, "h2o", budget=12, sink_tokens=2, recent_window=3, chunk_size=16) as model:
        out = beam(model, ids, max_new_tokens=6, num_beams=2, num_return_sequences=2)
    assert out.sequences.shape == (4, 46)
    assert out.cache.stats()["kept_per_layer_head"] == [[[12, 12]] * 4] * 2  # [layer][batch*beams][head]
    assert out.cache.tokens_seen == 40 + 5
    for layer in out.cache.layers:  # every beam still has its sinks and its recent tokens at their own positions
        assert (layer.positions[:, :, :2] == torch.tensor([0, 1])).all()
        assert (layer.positions[:, :, -3:] == torch.tensor([42, 43, 44])).all()


def test_cache_repeat_interleave_matches_expanded_prefill(tiny):
    """Filling a cache for one row then repeating it equals filling it for the repeated rows."""
    ids = random_ids(18, seed=62)
    with torch.no_grad(), attached(tiny, "snapkv", budget=10, sink_tokens=1, recent_window=2, chunk_size=8) as model:
        one = model.new_cache()
        model(ids, cache=one)
        one.batch_repeat_interleave(3)
        three = model.new_cache()
        model(ids.repeat(3, 1), cache=three)
        nxt = random_ids(1, seed=63)
        a = model(nxt.repeat(3, 1), cache=one).logits
        b = model(nxt.repeat(3, 1), cache=three).logits
    assert max_diff(a, b) < 1e-5
    for la, lb in zip(one.layers, three.layers):
        assert torch.equal(la.positions, lb.positions)
        assert max_diff(la.state["queries"], lb.state["queries"]) < 1e-6  # SnapKV's query window moved too


# ---------------------------------------------------------------------------------------------------------
# per-call settings
# ---------------------------------------------------------------------------------------------------------
def test_eviction_override_per_call(tiny):
    ids = random_ids(30, seed=64)
    with attached(tiny, "streaming_llm", budget=20, sink_tokens=2, recent_window=4, chunk_size=8) as model:
        a = model.generate(ids, max_new_tokens=2, return_dict_in_generate=True)
        b = model.generate(ids, max_new_tokens=2, return_dict_in_generate=True, eviction=dict(budget=8))
        cache = model.new_cache(dict(budget=10))
        c = model.generate(ids, max_new_tokens=2, return_dict_in_generate=True, cache=cache)
        assert model.trainkv_state.eviction.budget == 20  # the attached settings are unchanged
    assert a.cache.stats()["kept_per_layer_head"][0] == [[20, 20]]
    assert b.cache.stats()["kept_per_layer_head"][0] == [[8, 8]]
    assert c.cache is cache and cache.stats()["kept_per_layer_head"][0] == [[10, 10]]


@pytest.mark.parametrize("prompt,chunk", [(30, 10), (33, 32), (20, 1)])
def test_no_eviction_during_decoding_lets_the_cache_grow(tiny, prompt, chunk):
    """Prefill still evicts after every chunk -- also a last chunk of one token, or chunks of one token, which
    must not be mistaken for decoding steps -- then the cache grows by one per generated token."""
    ids = random_ids(prompt, seed=65)
    with attached(tiny, "h2o", budget=12, sink_tokens=2, recent_window=4, chunk_size=chunk,
                  evict_during_decoding=False) as model:
        out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True)
    assert out.cache.stats()["kept_per_layer_head"][0] == [[12 + 4, 12 + 4]]
    assert out.cache.tokens_seen == prompt + 4


# ---------------------------------------------------------------------------------------------------------
# detach
# ---------------------------------------------------------------------------------------------------------
def test_detach_restores_the_plain_model(tiny):
    ids = random_ids(20, seed=66)
    cls = type(tiny)
    with torch.no_grad():
        ref = tiny(ids).logits
    ref_tokens, ref_logits, _ = greedy(tiny, ids, new=5)
    grads = {n: p.requires_grad for n, p in tiny.named_parameters()}
    state = {k: v.clone() for k, v in tiny.state_dict().items()}

    trainkv.attach(tiny, "snapkv", trainkv.EvictionConfig(budget=8, sink_tokens=2, recent_window=2, chunk_size=4))
    assert type(tiny) is not cls and isinstance(tiny, cls)
    assert tiny.config._attn_implementation == "trainkv"
    assert not any(p.requires_grad for p in tiny.parameters())  # backbone frozen
    assert len(trainkv.method_modules(tiny)) == 2
    tiny.generate(ids, max_new_tokens=3)  # evicting generate ran
    trainkv.detach(tiny)

    assert type(tiny) is cls
    assert not hasattr(tiny, "trainkv_state")
    assert tiny.config._attn_implementation == "sdpa"
    assert {n: p.requires_grad for n, p in tiny.named_parameters()} == grads
    assert tiny.state_dict().keys() == state.keys()
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in state.items())
    for module in tiny.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not hasattr(module, "trainkv_method")
        assert not any(k.startswith("_trainkv") for k in vars(module))
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, ref)
    tokens, logits, out = greedy(tiny, ids, new=5)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    assert not isinstance(out.cache, trainkv.EvictingCache)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 (integration)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm_beam_search_equals_plain(smollm):
    model, tok = smollm
    ids = prose_ids(tok, 60, offset=15000)
    ref = beam(model, ids, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    with attached(model, "tova", budget=128, chunk_size=32):
        out = beam(model, ids, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_diff(out.sequences_scores, ref.sequences_scores) < TOL


@pytest.mark.integration
def test_smollm_evicting_generate_stays_in_budget(smollm):
    model, tok = smollm
    ids = prose_ids(tok, 280, offset=20000)
    with attached(model, "snapkv", budget=64, sink_tokens=4, recent_window=16, chunk_size=128):
        tokens, logits, out = greedy(model, ids, new=4)
    stats = out.cache.stats()
    assert stats["tokens_seen"] == 283
    assert stats["kept_per_layer_head"] == [[[64] * 3]] * 30
    assert torch.isfinite(logits).all() and tokens.shape == (1, 4)
