"""Bad input gets a clear error, nothing silently wrong."""

from __future__ import annotations

import pytest
import torch

import trainkv
from runtime_helpers import attached, make_tiny, random_ids


# ---------------------------------------------------------------------------------------------------------
# eviction settings
# ---------------------------------------------------------------------------------------------------------
def test_budget_smaller_than_protected_tokens():
    with pytest.raises(ValueError, match=r"budget 20 is smaller than the protected tokens \(sink_tokens=4 \+ "
                                         r"recent_window=32 = 36\)"):
        trainkv.EvictionConfig(budget=20, sink_tokens=4, recent_window=32)
    trainkv.EvictionConfig(budget=36, sink_tokens=4, recent_window=32)  # exactly the protected tokens is fine


def test_layer_and_head_budgets_below_protected():
    with pytest.raises(ValueError, match="layer_budgets has an entry 5 below the protected tokens"):
        trainkv.EvictionConfig(budget=64, sink_tokens=2, recent_window=4, layer_budgets=[64, 5])
    with pytest.raises(ValueError, match="head_budgets has an entry below the protected tokens"):
        trainkv.EvictionConfig(budget=64, sink_tokens=2, recent_window=4, head_budgets=[[8, 3]])


@pytest.mark.parametrize("chunk", [0, -4, 2.5])
def test_chunk_size_must_be_positive_int(chunk):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        trainkv.EvictionConfig(chunk_size=chunk)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_float_budget_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"budget: .* a ratio must lie in \(0, 1\]"):
        trainkv.EvictionConfig(budget=ratio)


def test_other_bad_settings():
    assert trainkv.EvictionConfig(budget="64").budget == 64  # the budget language: text spellings too
    assert trainkv.EvictionConfig(budget="1/8").budget == 0.125
    for bad in (True, "lots", [64]):
        with pytest.raises(ValueError, match=r"is not a budget; use entries .* like 512, or a ratio .* 1/8"):
            trainkv.EvictionConfig(budget=bad)
    with pytest.raises(ValueError, match="mode must be 'budget' or 'threshold'"):
        trainkv.EvictionConfig(mode="topk")
    with pytest.raises(ValueError, match=r"recent_window must be an integer >= 0 \(tokens\), got -1"):
        trainkv.EvictionConfig(recent_window=-1)
    with pytest.raises(ValueError, match=r"sink_tokens must be an integer >= 0 \(tokens\), got 2.5"):
        trainkv.EvictionConfig(sink_tokens=2.5)
    with pytest.raises(ValueError, match="threshold must be a number"):
        trainkv.EvictionConfig(mode="threshold", threshold=float("nan"))
    assert trainkv.EvictionConfig(mode="threshold", threshold=float("-inf")).threshold == float("-inf")
    # a retired key of older checkpoints loads (dropped); it is not a field any more
    assert "seed" not in trainkv.EvictionConfig.from_dict({"budget": 64, "seed": 0}).to_dict()
    with pytest.raises(ValueError, match=r"unknown eviction settings \['bugdet'\]"):
        trainkv.EvictionConfig.from_dict({"bugdet": 64})
    with pytest.raises(ValueError, match="unknown method 'snap'"):
        trainkv.make_config("snap")


def test_budget_tables_must_match_the_model(tiny):
    with pytest.raises(ValueError, match="layer_budgets has 3 entries, the model has 2 layers"):
        trainkv.EvictingCache.for_model(tiny, trainkv.EvictionConfig(sink_tokens=0, recent_window=4,
                                                                     layer_budgets=[8, 8, 8]))
    with pytest.raises(ValueError, match="head_budgets has 1 entries, the model has 2 layers"):
        trainkv.EvictingCache.for_model(tiny, trainkv.EvictionConfig(sink_tokens=0, recent_window=4,
                                                                     head_budgets=[[8, 8]]))
    with attached(tiny, "h2o", sink_tokens=0, recent_window=4, head_budgets=[[8, 8, 8], [8, 8, 8]]) as model:
        with pytest.raises(ValueError, match=r"head_budgets\[0\] has 3 entries, the model has 2 KV heads"):
            model.generate(random_ids(12), max_new_tokens=1)


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(NotImplementedError, match="trainkv supports Llama-family decoders.*model_type='gpt2'"):
        trainkv.attach(gpt2, "h2o")
    assert not hasattr(gpt2, "trainkv_state")


def test_sliding_window_model_refused():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    cfg.use_sliding_window = True
    with pytest.raises(NotImplementedError, match="sliding-window attention"):
        trainkv.attach(MistralForCausalLM(cfg), "h2o")


def test_attach_twice_and_detach_unattached(tiny):
    with attached(tiny, "h2o") as model:
        with pytest.raises(ValueError, match="already attached; call trainkv.detach"):
            trainkv.attach(model, "tova")
    with pytest.raises(ValueError, match="no trainkv method is attached"):
        trainkv.detach(tiny)


def test_evicting_cache_on_a_plain_model_is_refused(tiny):
    """Without the runtime the model's own attention would ignore validity/positions: refuse, don't compute."""
    cache = trainkv.EvictingCache.for_model(tiny, trainkv.EvictionConfig(budget=64, sink_tokens=2, recent_window=4))
    with pytest.raises(RuntimeError, match="without the trainkv runtime.*trainkv.attach"):
        tiny(random_ids(8), cache=cache)


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def model():
    m = make_tiny(seed=9)
    trainkv.attach(m, "snapkv", trainkv.EvictionConfig(budget=16, sink_tokens=2, recent_window=4, chunk_size=8))
    return m


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.empty((1, 0), dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(input_ids=torch.empty((2, 0), dtype=torch.long), max_new_tokens=2)


def test_attention_mask_shape_mismatch(model):
    ids = random_ids(10, batch=2)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 9\) does not match input_ids \(2, 10\)"):
        model.generate(ids, attention_mask=torch.ones((2, 9), dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 10\) does not match input_ids \(2, 10\)"):
        model.generate(ids, attention_mask=torch.ones((1, 10), dtype=torch.long), max_new_tokens=2)


def test_forward_mask_shorter_than_new_tokens(model):
    cache = model.new_cache()
    with pytest.raises(ValueError, match="attention_mask has 3 columns but 5 new tokens were given"):
        model(random_ids(5), attention_mask=torch.ones((1, 3), dtype=torch.long), cache=cache)


def test_right_padding(model):
    ids = random_ids(10, batch=2)
    mask = torch.ones((2, 10), dtype=torch.long)
    mask[1, 7:] = 0
    with pytest.raises(ValueError, match="right padding is not supported: pad on the left"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_assisted_decoding(model):
    ids = random_ids(10)
    with pytest.raises(NotImplementedError, match="assistant_model: assisted decoding needs cache rollback"):
        model.generate(ids, assistant_model=make_tiny(seed=10), max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="prompt_lookup_num_tokens: assisted decoding"):
        model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        model.new_cache().layers[0].crop(-1)


def test_cache_and_eviction_settings_together(model):
    with pytest.raises(ValueError, match="pass either a cache or eviction settings, not both"):
        model.generate(random_ids(10), cache=model.new_cache(), eviction=dict(budget=32), max_new_tokens=2)
