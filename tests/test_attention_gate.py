"""Attention-Gate: gate computation, training/runtime agreement (invariant 5), and training behaviour."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import trainkv
from gate_reference import PAD, REFERENCE, compute, fixed_hidden, load_checkpoint_gates, runtime_scores, valid_mask
from trainkv.methods import gate_runtime
from trainkv.methods.attention_gate import AttentionGate, gated_chunk_attention, target_keep, window_attention
from trainkv.methods.window_attention import window_mask

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


@pytest.mark.parametrize("n,c,window", [(30, 30, 7), (30, 5, 7), (30, 1, 7), (100, 37, 8), (64, 64, 64), (10, 10, 64),
                                         (200, 150, 16), (5, 1, 64), (70, 3, 64), (130, 65, 64)])
def test_window_attention_blocks_and_short_chunks_match_masked_sdpa(n, c, window):
    """Both code paths (c <= W: one banded SDPA; c > W: blocks of W over [previous, own] block), with padding."""
    torch.manual_seed(n + c)
    q, k, v = torch.randn(2, 2, c, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, :5] = False
    valid[1, n // 2] = False
    i = torch.arange(n - c, n)[:, None]
    j = torch.arange(n)[None, :]
    for vv in (valid, None):
        keep = vv if vv is not None else torch.ones(2, n, dtype=torch.bool)
        mask = ((j <= i) & (j > i - window))[None] & keep[:, None, :] | (j == i)[None]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        assert (window_attention(q, k, v, vv, window) - ref).abs().max() < 1e-5


def test_checkpoint_scores_match_the_pre_issue8_reference():
    """The committed SmolLM2 gates give the scores the code before the run-time rewrite gave (fixed input)."""
    from safetensors.torch import load_file

    reference = load_file(REFERENCE)
    now = compute()
    for name in ("whole", "chunked"):
        assert (now[name] - reference[name]).abs().max() < 1e-4, name


@pytest.mark.parametrize("chunk", [1, 7, 64, 65, 200])
def test_runtime_chunks_of_any_size_equal_the_whole_sequence_gate(chunk):
    """Ring buffer + masks for every chunk size (decoding steps, short chunks, blocks), and with left padding:
    a padded row scores its real tokens as the unpadded sequence would."""
    gates = load_checkpoint_gates()
    hidden, valid = fixed_hidden(gates[0].hidden_size), valid_mask()
    with torch.no_grad():
        for gate in (gates[0], gates[-1]):
            scores = runtime_scores(gate, hidden, valid, chunk)
            assert (scores[0] - gate.gate_logits(hidden[:1])[0]).abs().max() < 1e-4
            assert (scores[1, :, PAD:] - gate.gate_logits(hidden[1:, PAD:])[0]).abs().max() < 1e-4


def test_runtime_gate_needs_no_mask_once_its_window_is_real_tokens():
    from types import SimpleNamespace

    from trainkv.methods.base import ScoreContext

    gate = load_checkpoint_gates()[0]
    hidden, w = fixed_hidden(gate.hidden_size), gate.config.gate_window
    layer = SimpleNamespace(owner=SimpleNamespace(pending_valid=None), state={})
    with torch.no_grad():
        for s in range(0, w + 16, 16):
            gate.new_token_scores(ScoreContext(None, layer, hidden[:, s:s + 16], None, 1.0, False))
            assert (layer.state["gate_valid"] is None) == (s + 16 >= w)
    assert window_mask(1, w, None, hidden.device) is None  # a decoding step over a full window: plain SDPA
    assert window_mask(256, w, None, hidden.device) is window_mask(256, w, None, hidden.device)  # cached


@pytest.fixture
def restore_gate_runtime():
    before = dataclasses.asdict(gate_runtime.options())
    yield
    gate_runtime.configure(**before)


def _runtime_scores_with(**options):
    gate_runtime.configure(**options)
    gate = load_checkpoint_gates()[3]
    with torch.no_grad():
        return runtime_scores(gate, fixed_hidden(gate.hidden_size), valid_mask(), 48)


def test_compiled_gate_equals_eager(restore_gate_runtime):
    eager = _runtime_scores_with(compile=False)
    traced = _runtime_scores_with(compile=True, compile_on_cpu=True, backend="eager")  # dynamo graph capture, no codegen
    assert gate_runtime.compile_status()["compiled"]
    assert (traced - eager).abs().max() < 1e-5


def test_compile_failure_falls_back_to_eager(restore_gate_runtime):
    eager = _runtime_scores_with(compile=False)
    with pytest.warns(RuntimeWarning, match="compiling the Attention-Gate failed"):
        fallback = _runtime_scores_with(compile=True, compile_on_cpu=True, backend="no_such_backend")
    assert gate_runtime.compile_status()["failure"]
    assert torch.equal(fallback, eager)


def test_compile_is_off_on_cpu_unless_asked(restore_gate_runtime, monkeypatch):
    monkeypatch.setenv(gate_runtime.ENV_VAR, "1")
    opts = gate_runtime.configure(compile=None)
    assert opts.compile_enabled(torch.device("cuda")) and not opts.compile_enabled(torch.device("cpu"))
    monkeypatch.setenv(gate_runtime.ENV_VAR, "0")
    assert not opts.compile_enabled(torch.device("cuda"))


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


def test_gated_chunk_attention_never_runs_on_cudnn_attention(monkeypatch):
    """Issue 18's NaN at step 13 of the Qwen2.5-Coder-0.5B recipe: on H100/H200 the gated attention's masked bf16 SDPA
    went to cuDNN attention, whose backward returns NaN query gradients for key lengths of 64 mod 128 when a row's
    logsumexp is below -88.7 (pytorch/pytorch#196678). Every SDPA of the training attention runs with cuDNN attention
    off (the backward kernel is the one chosen in the forward), the other backends as the caller left them, and
    the caller's settings come back afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append((cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                     cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    model = attached()
    model.train()
    ids = torch.randint(0, 128, (1, 3 * CHUNK + 5))
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
              cuda.math_sdp_enabled())
    assert before[0], "cuDNN attention is on by default: the test needs it on to see it turned off"
    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", recording_sdpa)
        loss, _ = AttentionGate.training_loss(model, {"input_ids": ids}, 0.5)
        loss.backward()
    # the teacher's forward (no gradient, plain SDPA): one call per layer; then the student's: per layer, the gate's
    # own sliding-window attention and the 4 chunks of the gated attention
    assert seen[:2] == [before] * 2
    assert seen[2:] == [(False, True, True, True)] * (2 * (1 + 4))
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled()) == before
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)

    seen.clear()  # backends the caller turned off stay off
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    with monkeypatch.context() as m, sdpa_kernel([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]):
        m.setattr(F, "scaled_dot_product_attention", recording_sdpa)
        gated_chunk_attention(q, k, v, torch.zeros(1, 2, 40), 0.25, chunk=16, sinks=2, window=8)
    assert seen == [(False, False, False, True)] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN attention bug needs a CUDA device (H100/H200)")
def test_gated_chunk_attention_gradients_finite_at_64_mod_128_keys_with_very_negative_logits():
    """The failing case itself on a GPU: 704 keys (64 mod 128) and every logit ~ -120, so every row's logsumexp is
    below -88.7; with cuDNN attention (torch 2.11+, H100/H200) the query gradient was NaN."""
    import math

    torch.manual_seed(0)
    n, d = 704, 64
    q = torch.randn(1, 2, n, d, device="cuda", dtype=torch.bfloat16) * 0.1
    k = torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16) * 0.1
    v = torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(d)
    log_gate = torch.full((1, 1, n), -0.01, device="cuda", requires_grad=True)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = gated_chunk_attention(q, k, v, log_gate, d**-0.5, chunk=1024, sinks=4, window=64)
    out.backward(torch.randn_like(out))
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert bool(torch.isfinite(x.grad).all()), f"non-finite gradient of {name}"


def _full_logits_distillation_loss(model, mods, batch, loss, kl_reduction):
    """The loss from the whole sequence's logits (distillation_loss before it kept only the loss positions)."""
    from trainkv.methods.attention_gate import reduce_kl, teacher_student_logits

    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    teacher, student = teacher_student_logits(model, mods, inputs)
    mask = F.pad(labels[:, 1:] != -100, (0, 1), value=False) & batch["attention_mask"].bool()
    total = student.new_zeros(())
    if "kl" in loss:
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
        total = total + reduce_kl(kl, mask, kl_reduction)
    if "lm" in loss:
        total = total + F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return total


@pytest.mark.parametrize("loss,reduction", [("kl", "token"), ("kl", "row"), ("lm", "token"), ("kl+lm", "row")])
def test_logits_only_at_loss_positions_give_the_full_logits_loss_and_gradients(loss, reduction):
    """distillation_loss computes the logits only where a label is predicted (the union over the rows): same loss
    and gate gradients as from every position's logits (fp32), with padding and answers at different places."""
    from trainkv.methods.attention_gate import distillation_loss

    model = attached()
    randomize_gates(model, scale=0.3)
    model.train()
    mods = trainkv.method_modules(model)
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 80))
    attention_mask = torch.ones(2, 80, dtype=torch.long)
    attention_mask[1, 70:] = 0
    labels = torch.full((2, 80), -100)
    labels[0, 60:75] = ids[0, 60:75]
    labels[1, 50:70] = ids[1, 50:70]
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    ref = _full_logits_distillation_loss(model, mods, batch, loss, reduction)
    ref_grads = torch.autograd.grad(ref, params)
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    new, logs = distillation_loss(model, mods, batch, loss, reduction)
    hook.remove()
    new_grads = torch.autograd.grad(new, params)
    assert set(shapes) == {(2, 74 - 49, 128)}  # positions 49..73 predict a label in some row
    assert ref.item() > 1e-4, "the gates must change the logits for this test to mean anything"
    assert abs(new.item() - ref.item()) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(new_grads, ref_grads)) <= 1e-6
    assert set(logs) == {"kl", "lm"} & set(loss.split("+"))
