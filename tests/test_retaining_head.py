"""Locret retaining heads (trainkv.methods.retaining_head) on a tiny random GQA Llama, CPU."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import trainkv
from trainkv.attach import attach
from trainkv.methods import method_modules
from trainkv.config import EvictionConfig
from trainkv.methods import get_method, make_config
from trainkv.methods.retaining_head import (
    RetainingHead,
    RetainingHeadConfig,
    answer_and_key_masks,
    causal_importance,
    param_count,
)


def tiny_config(**kw):
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed=0, **method_kw):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval()
    return attach(model, "retaining_head", **method_kw)


def sft_batch():
    """Two right-padded rows: an SFT row (prompt + answer labels) and a short CPT row (labels everywhere)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    labels = torch.full((2, 24), -100)
    labels[0, 15:22] = ids[0, 15:22]  # answer tokens 15..21, then two unlabelled tokens
    labels[1, :18] = ids[1, :18]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_registered_and_config_round_trip():
    assert get_method("retaining_head") is RetainingHead
    cfg = make_config("retaining_head", hidden=32, stabilizers=100, final_tokens=120)
    assert RetainingHeadConfig.from_dict(cfg.to_dict()) == cfg
    ev = cfg.eviction_config(budget=256, chunk_size=64)
    assert (ev.recent_window, ev.evict_during_decoding, ev.mode, ev.chunk_size) == (120, False, "budget", 64)
    with pytest.raises(ValueError):
        RetainingHeadConfig(answer_region="everything")


def test_answer_region_auto_uses_labels_for_sft_rows_and_the_tail_for_text():
    cfg = RetainingHeadConfig(target_queries=5)
    b = sft_batch()
    answer, keys = answer_and_key_masks(cfg, b["attention_mask"], b["labels"])
    assert answer[0].nonzero().flatten().tolist() == list(range(15, 22))
    assert keys[0].nonzero().flatten().tolist() == list(range(0, 15))  # prompt keys before the last answer token
    assert answer[1].nonzero().flatten().tolist() == list(range(13, 18))  # last 5 real tokens
    assert keys[1].nonzero().flatten().tolist() == list(range(0, 13))


def _brute_force_targets(model, batch, cfg):
    """Full T×T logits from the layers' own projections and RoPE, max over answer p > j and the group
    (``log_attention``: the logits turned into log softmax weights over each query's causal, real keys)."""
    captured = {}

    def grab(i):
        def hook(module, args, kwargs):
            captured[i] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    layers = model.model.layers
    handles = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in handles:
        h.remove()
    answer, keys = answer_and_key_masks(cfg, batch["attention_mask"], batch["labels"])
    real = batch["attention_mask"].bool()
    out = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hidden, (cos, sin) = captured[i]
        bsz, t, _ = hidden.shape
        q = attn.q_proj(hidden).view(bsz, t, -1, 16).transpose(1, 2)
        k = attn.k_proj(hidden).view(bsz, t, -1, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        hq, hkv = q.shape[1], k.shape[1]
        g = hq // hkv
        target = torch.full((bsz, hkv, t), float("-inf"))
        with torch.no_grad():
            for b in range(bsz):
                for head in range(hq):
                    full = q[b, head] @ k[b, head // g].T * attn.scaling  # [T, T] logits
                    if cfg.target == "log_attention":
                        seen = torch.ones(t, t).tril().bool() & real[b][None, :]
                        full = full.masked_fill(~seen, float("-inf")).log_softmax(-1)
                    for j in range(t):
                        if not (keys[b, j] and real[b, j]):
                            continue
                        ps = [p for p in range(j + 1, t) if answer[b, p]]
                        if ps:
                            v = full[ps, j].max()
                            target[b, head // g, j] = torch.maximum(target[b, head // g, j], v)
        out.append((target, keys[:, None, :] & torch.isfinite(target)))
    return out


@pytest.mark.parametrize("target", ["logit", "log_attention"])
@pytest.mark.parametrize("chunk", [3, 256])
def test_target_equals_brute_force(chunk, target):
    model = tiny_model(target_chunk=chunk, target_queries=5, target=target)
    cfg = method_modules(model)[0].config
    batch = sft_batch()
    expected = _brute_force_targets(model, batch, cfg)
    heads = method_modules(model)
    answer, keys = answer_and_key_masks(cfg, batch["attention_mask"], batch["labels"])
    request = {"answer": answer, "keys": keys, "real": batch["attention_mask"].bool()}
    for h in heads:
        h._request = request
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h, (target, mask) in zip(heads, expected):
        assert torch.equal(h.last["mask"], mask)
        assert mask.sum() > 0
        torch.testing.assert_close(h.last["target"][mask], target[mask], atol=1e-5, rtol=1e-5)
        h._request = None


def test_causal_importance_on_a_hand_made_case():
    # 1 query head per KV head; keys are unit vectors, so logits are the query's entries.
    q = torch.zeros(1, 2, 4, 4)
    k = torch.eye(4).expand(1, 2, 4, 4).clone()
    q[0, 0, 2] = torch.tensor([1.0, 5.0, 9.0, 0.0])  # query at 2 sees keys 0, 1 (not itself)
    q[0, 0, 3] = torch.tensor([3.0, -1.0, 2.0, 7.0])
    answer = torch.tensor([[False, False, True, True]])
    real = torch.ones(1, 4, dtype=torch.bool)
    s = causal_importance(q, k, answer, real, scaling=1.0, chunk=1)
    assert s[0, 0, :3].tolist() == [3.0, 5.0, 2.0]
    assert s[0, 0, 3] == float("-inf")
    # log weights: query 2 normalises over keys 0..2 (itself included), query 3 over keys 0..3
    lp = causal_importance(q, k, answer, real, scaling=1.0, chunk=2, target="log_attention")
    w2 = torch.tensor([1.0, 5.0, 9.0]).log_softmax(0)
    w3 = torch.tensor([3.0, -1.0, 2.0, 7.0]).log_softmax(0)
    expected = [max(w2[0], w3[0]), max(w2[1], w3[1]), w3[2]]
    torch.testing.assert_close(lp[0, 0, :3], torch.stack(expected))
    assert bool((lp[0, 0, :3] <= 0).all())


def test_training_reduces_the_loss_and_changes_only_the_heads():
    model = tiny_model(hidden=32, target_queries=6)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if "trainkv_method" not in n}
    heads_before = {n: p.detach().clone() for n, p in model.named_parameters() if "trainkv_method" in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(heads_before)
    opt = torch.optim.AdamW(trainable, lr=5e-3, betas=(0.9, 0.95), weight_decay=0.0)
    batch = sft_batch()
    graph = []  # does the backbone's output carry an autograd graph? (it must not: training is cheap)
    model.model.norm.register_forward_hook(lambda m, a, out: graph.append(out.requires_grad))
    losses = []
    for step in range(40):
        loss, logs = RetainingHead.training_loss(model, batch, progress=step / 40)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(trainable, 0.5)
        opt.step()
        losses.append(loss.item())
    assert graph and not any(graph)
    assert set(logs) >= {"huber", "smooth", "top10_overlap"}
    assert 0.0 <= logs["top10_overlap"] <= 1.0
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():
        if n in backbone:
            assert p.grad is None, n
            assert p.detach().numpy().tobytes() == backbone[n].numpy().tobytes(), n
        else:
            assert not torch.equal(p.detach(), heads_before[n]), n


def test_chunked_prefill_scores_equal_whole_sequence_scores():
    model = tiny_model(hidden=32)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    heads = method_modules(model)
    # whole sequence, as in training
    t = ids.shape[1]
    request = {"answer": torch.ones(2, t, dtype=torch.bool), "keys": torch.ones(2, t, dtype=torch.bool),
               "real": torch.ones(2, t, dtype=torch.bool)}
    for h in heads:
        h._request = request
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    whole = [h.last["pred"].detach() for h in heads]
    for h in heads:
        h._request = h.last = None
    # runtime: chunks of 7 through the EvictingCache, budget above the length (no eviction)
    cache = model.new_cache(EvictionConfig(budget=64, chunk_size=7))
    with torch.no_grad():
        for s in range(0, t, 7):
            model(input_ids=ids[:, s : s + 7], cache=cache, use_cache=True)
    for layer, ref in zip(cache.layers, whole):
        assert layer.scores.shape == ref.shape
        torch.testing.assert_close(layer.scores, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool_kernel", [1, 3])
def test_runtime_keeps_top_scored_tokens_and_generates(pool_kernel):
    model = tiny_model(hidden=32, stabilizers=4, pool_kernel=pool_kernel)
    cfg = method_modules(model)[0].config
    ev = cfg.eviction_config(budget=12, chunk_size=8, sink_tokens=2)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(ev)
    with torch.no_grad():
        for s in range(0, 30, 8):
            model(input_ids=ids[:, s : s + 8], cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 12
        pos = layer.positions[0]  # [H, 12]
        assert bool((pos[:, :2] == torch.tensor([0, 1])).all())  # sinks
        assert bool((pos[:, -4:] == torch.arange(26, 30)).all())  # stabilizers = recent window
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eviction=ev)
    assert out.shape == (1, 35)


def test_param_count():
    model = tiny_model(hidden=32)
    actual = sum(p.numel() for m in method_modules(model) for p in m.parameters())
    assert actual == param_count(model.config, 32) == 2 * ((4 + 4) * 16 * 32 + 32 * 2)
    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    report = {}
    for name, conf in (("smollm2-135m", smol), ("llama3.1-8b", llama8b)):
        with torch.device("meta"):
            backbone = sum(p.numel() for p in LlamaForCausalLM(conf).parameters())
        for hidden in (128, 256, 1024):
            report[(name, hidden)] = (param_count(conf, hidden), param_count(conf, hidden) / backbone)
    assert report[("llama3.1-8b", 1024)][0] == 201_588_736  # the paper's 201.6M, 2.5%
    assert math.isclose(report[("llama3.1-8b", 1024)][1], 0.0251, abs_tol=5e-4)
    print({k: (n, f"{100 * r:.2f}%") for k, (n, r) in report.items()})


def test_pool_kernel_max_pools_scores_within_each_chunk():
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(5))
    plain, pooled = tiny_model(hidden=32), tiny_model(hidden=32, pool_kernel=5)  # same seed: same heads
    out = []
    for model in (plain, pooled):
        cache = model.new_cache(EvictionConfig(budget=64, chunk_size=7))
        with torch.no_grad():
            for s in range(0, 21, 7):
                model(input_ids=ids[:, s : s + 7], cache=cache, use_cache=True)
        out.append(cache.layers[0].scores)
    raw, got = out
    for s in range(0, 21, 7):  # each chunk pooled on its own: the max of the raw scores within +-2 in the chunk
        for i in range(s, s + 7):
            lo, hi = max(s, i - 2), min(s + 7, i + 3)
            torch.testing.assert_close(got[..., i], raw[..., lo:hi].amax(-1))


def test_stabilizers_as_a_fraction_of_the_budget():
    cfg = RetainingHeadConfig(stabilizers=0.5, final_tokens=10)
    assert cfg.stabilizer_tokens(256) == 128 and cfg.protected_recent(256) == 128 and cfg.protected_recent(12) == 10
    assert cfg.eviction_config(budget=256).recent_window == 128
    assert RetainingHeadConfig(stabilizers=32).protected_recent(256) == 32
    assert RetainingHeadConfig(stabilizers=32).protected_recent(32) == 16  # never more than half the budget
    with pytest.raises(ValueError, match="keep ratio"):
        cfg.eviction_config(budget=0.125)
    with pytest.raises(ValueError, match="fraction"):
        RetainingHeadConfig(stabilizers=1.5)
    with pytest.raises(ValueError, match="odd"):
        RetainingHeadConfig(pool_kernel=4)
