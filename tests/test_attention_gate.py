"""Attention-Gate: gate computation, training/runtime agreement (invariant 5), and training behaviour."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import trainkv
from trainkv.methods.attention_gate import AttentionGate, gated_chunk_attention, target_keep, window_attention

CHUNK, SINKS, WINDOW = 16, 2, 8


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def attached(seed: int = 0, **method) -> LlamaForCausalLM:
    model = tiny_model(seed)
    eviction = trainkv.EvictionConfig(budget=1000, chunk_size=CHUNK, sink_tokens=SINKS, recent_window=WINDOW)
    return trainkv.attach(model, "attention_gate", eviction, gate_window=10, **method)


def randomize_gates(model, scale: float = 1.0) -> None:
    torch.manual_seed(1)
    for g in trainkv.method_modules(model):
        torch.nn.init.normal_(g.out.weight, std=3.0 * scale)
        torch.nn.init.normal_(g.direct.weight, std=1.0 * scale)
        g.out.bias.data.zero_()


def backbone_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "trainkv_method" not in name:
            h.update(name.encode())
            h.update(t.detach().float().numpy().tobytes())
    return h.hexdigest()


def test_window_attention_matches_masked_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 30, 8) for _ in range(3))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, :5] = False
    out = window_attention(q, k, v, valid, 7)
    i = torch.arange(30)
    band = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < 7)
    mask = (band[None] & valid[:, None, :]) | torch.eye(30, dtype=torch.bool)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    assert (out - ref).abs().max() < 1e-5


def test_runtime_gate_scores_equal_whole_sequence_gate():
    """Chunked prefill (ring buffer of gate keys) gives the same logits as the gate over the whole sequence."""
    model = attached()
    randomize_gates(model)
    ids = torch.randint(0, 128, (2, 100))
    captured = []
    handle = model.model.layers[1].self_attn.register_forward_pre_hook(
        lambda mod, a, kw: captured.append(kw["hidden_states"]), with_kwargs=True)
    cache = model.new_cache()
    with torch.no_grad():
        for s in range(0, 100, CHUNK):
            model(ids[:, s:s + CHUNK], cache=cache)
    handle.remove()
    gate = trainkv.method_modules(model)[1]
    with torch.no_grad():
        whole = gate.gate_logits(torch.cat(captured, dim=1))
    assert (cache.layers[1].scores - whole).abs().max() < 1e-4


def test_zero_log_gates_are_plain_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 50, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    out = gated_chunk_attention(q, k, v, torch.zeros(2, 2, 50), 0.25, chunk=16, sinks=2, window=8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert (out - ref).abs().max() < 1e-5


def test_training_mask_equals_runtime_threshold_eviction():
    """Invariant 5: with saturated gates, the training attention = the runtime's threshold-mode eviction
    at the same chunk size and window; both differ clearly from no eviction."""
    model = attached()
    randomize_gates(model, scale=1.0)
    gates = trainkv.method_modules(model)
    for g in gates:  # saturate: logits far from 0 so sigmoid is 0 or 1 up to ~1e-13
        g.out.weight.data *= 1e3
        g.direct.weight.data *= 1e3
    ids = torch.randint(0, 128, (2, 96))
    with torch.no_grad():
        plain = model(ids).logits
    cache = model.new_cache(model.trainkv_state.eviction.replace(mode="threshold", threshold=0.0, budget=1.0))
    with torch.no_grad():
        runtime = torch.cat([model(ids[:, s:s + CHUNK], cache=cache).logits for s in range(0, 96, CHUNK)], dim=1)
        for g in gates:
            g.soft_eviction = True
        trained = model(ids).logits
        for g in gates:
            g.soft_eviction = False
    kept = cache.layers[0].kept_counts()
    assert bool((kept < 96).all()), "the gates must evict something for this test to mean anything"
    assert (trained - runtime).abs().max() < 1e-3
    assert (plain - runtime).abs().max() > 1e-2


def test_training_reduces_loss_and_only_gates_change():
    model = attached(target_keep=0.25, ramp=0.0, init_bias=2.0)
    model.train()
    before = backbone_digest(model)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("trainkv_method" in n for n in names)
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = torch.randint(0, 128, (2, 96))
    losses = []
    for step in range(25):
        loss, logs = AttentionGate.training_loss(model, {"input_ids": ids}, step / 25)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert backbone_digest(model) == before
    assert any(not torch.equal(a, b) for a, b in zip(start, params))
    assert all(p.grad is None for n, p in model.named_parameters() if "trainkv_method" not in n)


def test_keep_ratio_loss_moves_keep_toward_target():
    model = attached(target_keep=0.2, ramp=0.0, init_bias=3.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    ids = torch.randint(0, 128, (2, 96))
    keeps = []
    for _ in range(30):
        loss, logs = AttentionGate.training_loss(model, {"input_ids": ids}, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        keeps.append(logs["keep"])
    assert keeps[0] > 0.9
    assert keeps[-1] <= 0.2 + 0.05


def test_target_ramp():
    cfg = trainkv.make_config("attention_gate", target_keep=0.1, ramp=0.5)
    assert target_keep(cfg, 0.0) == pytest.approx(1.0)
    assert target_keep(cfg, 0.25) == pytest.approx(0.55)
    assert target_keep(cfg, 0.5) == pytest.approx(0.1)
    assert target_keep(cfg, 1.0) == pytest.approx(0.1)


def test_training_semantics_follow_the_attached_eviction_config():
    model = attached()
    assert trainkv.method_modules(model)[0].training_semantics() == (CHUNK, SINKS, WINDOW)
    trainkv.detach(model)
    trainkv.attach(model, "attention_gate", trainkv.EvictionConfig(budget=64), train_chunk_size=7)
    assert trainkv.method_modules(model)[0].training_semantics() == (7, 4, 32)


def test_gate_parameter_count_is_small():
    model = attached()
    gate = sum(p.numel() for p in trainkv.method_modules(model)[0].parameters())
    hidden, heads = 64, 2
    assert gate == hidden * 3 * 2 * 16 + 2 * 16 * heads + heads + hidden * heads
