"""Issue 19: the static-shape decode step (slot replacement, `trainkv.static_decode`) equals today's compacting step.

For every method, uniform and ragged (per-layer and per-head) budgets, batch 1 and a left-padded batch of 3
(one row shorter than the budgets, so it fills free slots while decoding), 64 decoding steps run on two caches
of the same model: the compacting one and the static one. At every step the greedy tokens agree, the logits
agree within 1e-4 (fp32) and every (row, layer, KV head) keeps the same *set* of original positions.

Ties: which of two equally scored entries leaves is implementation-defined in today's path (CPU top-k is not
stable under ties; the static step evicts the tied entry in the lowest slot), so the comparisons avoid exact
ties: the tiny model has a 512-token vocabulary, each row's prompt and fed tokens are all distinct (content-only
scorers -- gates, Locret heads -- give a repeated token the same score in layer 0), the decoding steps are fed
those tokens (the greedy choices are compared, not fed back: greedy loops repeat tokens), and the Locret head runs
with ``pool_kernel=1`` (max-pooling makes neighbours tie by construction). Then:
no device-to-host read in steady state, generate (EOS rows, beam search, several return sequences, sampling),
the fallbacks and their one-line reasons, the CUDA-graph runner's logic (emulated on CPU: capture, replay,
reuse across generate calls, two caches, capture failure), and that a wrong slot choice is caught.
"""

from __future__ import annotations

import logging
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainkv
import trainkv.static_decode as sd
from runtime_helpers import TOL, expected_kept, greedy, left_pad, make_tiny, max_diff
from trainkv.decode_graphs import DecodeGraphs

STEPS = 64
SINK, WINDOW, CHUNK = 2, 4, 16
VOCAB = 512
BUDGETS = {
    "uniform": dict(budget=24),
    "ragged": dict(budget=24, head_budgets=[[12, 24], [20, 16]]),  # per layer (largest 24 vs 20) and per head
}
METHODS = ["streaming_llm", "h2o", "snapkv", "tova", "corm", "random", "attention_gate", "retaining_head",
           "layer_budget"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a loaded 2-core machine OpenMP spinning made this file 25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Every test sees the one-line reasons again (they are logged once per process)."""
    monkeypatch.setattr(sd, "_LOGGED", set())


def attach_method(model, method: str, **eviction):
    """Attach ``method`` with scores that differ between tokens (untrained gates would tie everywhere)."""
    settings = dict(sink_tokens=SINK, recent_window=WINDOW, chunk_size=CHUNK, **eviction)
    overrides = {}
    if method == "retaining_head":
        overrides = dict(pool_kernel=1)
    if method == "layer_budget":
        overrides = dict(per_head=True, train_base=True)
    if method == "tova_group":
        method, overrides = "tova", dict(average="group")
    trainkv.attach(model, method, trainkv.EvictionConfig(**settings), **overrides)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in trainkv.method_modules(model):
            for name, p in module.named_parameters():
                if name == "offset" or name.split(".")[-2] in ("out", "direct", "fc1", "fc2"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def tiny(seed: int = 1):
    return make_tiny(seed=seed, sharp=3.0, vocab_size=VOCAB)


def distinct_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(seed))[:n] + 1


def prompts(batch: int, steps: int = STEPS):
    """(input_ids, attention_mask, feed): prompts of 50 tokens (batch 1) or 50, 37 and 10 tokens left-padded
    (batch 3), and ``steps`` tokens per row to decode, every token of a row distinct."""
    lengths = (50,) if batch == 1 else (50, 37, 10)
    rows = [distinct_tokens(n + steps, seed=n) for n in lengths]
    ids, mask = left_pad([r[:n] for r, n in zip(rows, lengths)])
    return ids, mask, torch.stack([r[n:] for r, n in zip(rows, lengths)])


def kept_sets(cache) -> dict:
    out = {}
    for l, layer in enumerate(cache.layers):
        valid, pos = layer.valid_mask(), layer.positions
        for r in range(valid.shape[0]):
            for h in range(valid.shape[1]):
                out[(r, l, h)] = frozenset(pos[r, h][valid[r, h]].tolist())
    return out


def assert_same_sets(a: dict, b: dict, step: int) -> None:
    if a != b:
        key = next(k for k in a if a[k] != b.get(k))
        raise AssertionError(f"step {step}, (row, layer, head) {key}: compacting keeps {sorted(a[key])}, static "
                             f"keeps {sorted(b[key])}")


def prefill(model, cache, ids, mask, positions):
    cache.prefill_end = ids.shape[1]
    for s in range(0, ids.shape[1], CHUNK):
        e = min(ids.shape[1], s + CHUNK)
        logits = model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], cache=cache).logits
    return logits[:, -1]


@torch.no_grad()
def decode_pair(model, ids, mask, feed, steps: int = STEPS, check=True):
    """Prefill two caches, then ``steps`` decoding steps on both, fed the same seeded random tokens; checks the
    greedy choice, the logits and the kept sets at every step. Returns (compacting cache, static cache, max
    logit difference)."""
    compact, static = model.new_cache(), model.new_cache(decode=dict(static=True))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [prefill(model, c, ids, mask, positions) for c in (compact, static)]
    worst = max_diff(*outs)
    last = positions[:, -1]
    for t in range(steps):
        tokens = [o.argmax(-1) for o in outs]
        assert torch.equal(tokens[0], tokens[1]), f"greedy tokens differ at step {t}"
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last = last + 1
        outs = [model(feed[:, t:t + 1], attention_mask=mask, position_ids=last[:, None], cache=c).logits[:, -1]
                for c in (compact, static)]
        worst = max(worst, max_diff(*outs))
        assert static.in_static, "the static cache did not decode in slots"
        if check:
            assert worst <= TOL, f"step {t}: logits differ by {worst}"
            assert_same_sets(kept_sets(compact), kept_sets(static), t)
    return compact, static, worst


# ---------------------------------------------------------------------------------------------------------
# the step equals today's, for every method, budget layout and batch
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("budgets", list(BUDGETS))
@pytest.mark.parametrize("method", METHODS + ["tova_group"])
def test_static_step_equals_compacting_step(method, budgets, batch):
    model = attach_method(tiny(1), method, **BUDGETS[budgets])
    compact, static, worst = decode_pair(model, *prompts(batch))
    assert worst <= TOL
    # every head ends at its budget (the short row filled its free slots), in a buffer of static size
    budget_rows = BUDGETS[budgets].get("head_budgets") or [[24, 24]] * 2
    for layer, row in zip(static.layers, budget_rows):
        assert layer.kept_counts().tolist() == [row] * batch
        assert layer.keys.shape[-2] == sd._round_up(max(row) + 1, sd.SLOT_ALIGN)
    # leaving the slots gives back today's layout: exactly for layout-tracking methods, as sets otherwise
    static.end_static()
    assert_same_sets(kept_sets(compact), kept_sets(static), STEPS)
    if trainkv.method_modules(model)[0].static_layout:
        for a, b in zip(compact.layers, static.layers):
            assert a.keys.shape == b.keys.shape
            assert torch.equal(a.valid_mask(), b.valid_mask())
            assert torch.equal(a.positions.masked_fill(~a.valid_mask(), -1), b.positions.masked_fill(~b.valid_mask(), -1))
            assert max_diff(a.keys, b.keys) < 1e-5 and max_diff(a.scores, b.scores) < 1e-5


@pytest.mark.parametrize("budgets", list(BUDGETS))
@pytest.mark.parametrize("method", ["snapkv", "tova", "h2o"])
def test_filling_up_from_a_short_prompt(method, budgets):
    """Prompts shorter than every budget, left-padded: the first decoding steps only fill free slots (today's layout
    keeps its leading padding and grows), then eviction starts; the layout-dependent scores stay exact throughout."""
    model = attach_method(tiny(1), method, **BUDGETS[budgets])
    rows = [distinct_tokens(n + 40, seed=n) for n in (9, 5)]
    ids, mask = left_pad([rows[0][:9], rows[1][:5]])
    feed = torch.stack([rows[0][9:], rows[1][5:]])
    compact, static, _ = decode_pair(model, ids, mask, feed, steps=40)
    static.end_static()
    for a, b in zip(compact.layers, static.layers):
        assert a.keys.shape == b.keys.shape and torch.equal(a.valid_mask(), b.valid_mask())
        assert torch.equal(a.positions.masked_fill(~a.valid_mask(), -1), b.positions.masked_fill(~b.valid_mask(), -1))


def test_a_wrong_slot_choice_is_caught(monkeypatch):
    """The comparison above can fail: evicting the second-lowest entry instead of the lowest is detected."""
    honest = sd.select_slots

    def second_lowest(positions, scores, valid, budgets, order, length, sink, window):
        j, *rest = honest(positions, scores, valid, budgets, order, length, sink, window)
        n = positions.shape[-1] - 1
        protected = (positions < sink) | (positions > (positions[..., n] - window)[..., None])
        candidates = scores.masked_fill(protected | ~valid, float("inf"))
        second = candidates.topk(2, dim=-1, largest=False).indices[..., 1]
        return torch.where(valid.sum(-1) > budgets, second, j), *rest

    monkeypatch.setattr(sd, "select_slots", second_lowest)
    model = attach_method(tiny(1), "h2o", budget=24)
    with pytest.raises(AssertionError, match="compacting keeps|logits differ|tokens differ"):
        decode_pair(model, *prompts(1), steps=8)


def test_select_slots_against_brute_force():
    """One step on random slot buffers: the kept set is the protected entries plus the top-scored, up to each
    head's budget; a head under its budget keeps everything (the new entry takes a free slot)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        b, h, slots = 2, 3, 16
        budgets = torch.randint(SINK + WINDOW, slots - 1, (h,), generator=gen)
        valid = torch.rand((b, h, slots), generator=gen) < 0.8
        valid[..., -1] = True
        positions = torch.randperm(100, generator=gen)[: b * h * slots].view(b, h, slots)
        positions[..., -1] = 100 + trial  # the new token is the most recent
        scores = torch.rand((b, h, slots), generator=gen)
        # respect the invariant: at most budget + 1 entries (the new one included)
        for r in range(b):
            for hh in range(h):
                idx = valid[r, hh, :-1].nonzero().flatten()
                valid[r, hh, idx[int(budgets[hh]):]] = False
        j, new_score, new_position, _, _ = sd.select_slots(positions, scores, valid, budgets, None, None, SINK, WINDOW)
        for r in range(b):
            for hh in range(h):
                entries = valid[r, hh].nonzero().flatten().tolist()
                pos = positions[r, hh, entries].tolist()
                want = expected_kept(pos, scores[r, hh, entries].tolist(), int(budgets[hh]), SINK, WINDOW)
                slot = int(j[r, hh])  # receives the new entry; slot S-1 (the new entry's own) is then freed
                after = {int(positions[r, hh, s]) for s in entries if s not in (slot, slots - 1)}
                if slot != slots - 1:
                    after.add(int(positions[r, hh, -1]))
                assert after == want, (trial, r, hh)
                assert float(new_score[r, hh]) == float(scores[r, hh, -1])
                assert int(new_position[r, hh]) == int(positions[r, hh, -1])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_select_slots_compiles_as_one_graph(backend):
    """The slot choice compiles without graph breaks and with dynamic shapes (what ``compile_step`` relies on), and
    the compiled code agrees with eager, ties and free slots included (inductor's CPU argmin over bytes once
    returned slot 0 for buffers of 40 slots)."""
    compiled = torch.compile(sd.select_slots, backend=backend, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for slots in (16, 48):
        positions = torch.randperm(8 * slots, generator=gen)[: 3 * 2 * slots].view(3, 2, slots)
        positions[..., -1] = 8 * slots
        scores = torch.rand((3, 2, slots), generator=gen).round(decimals=1)  # ties
        valid = torch.rand((3, 2, slots), generator=gen) < 0.9
        valid[..., -1] = True
        order = torch.randperm(slots, generator=gen).repeat(3, 2, 1)
        length = torch.tensor(slots + 3)
        budgets = torch.tensor([slots - 8, slots - 3])
        for tracked in ((order, length), (None, None)):
            want = sd.select_slots(positions, scores, valid, budgets, *tracked, SINK, WINDOW)
            got = compiled(positions, scores, valid, budgets, *tracked, SINK, WINDOW)
            for w, g in zip(want, got):
                assert (w is None and g is None) or torch.equal(w, g)


# ---------------------------------------------------------------------------------------------------------
# no host sync per step
# ---------------------------------------------------------------------------------------------------------
class SyncSpy(TorchDispatchMode):
    READBACK = ("_local_scalar_dense", "nonzero", "masked_select")

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.READBACK):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.calls.append(f"{func} at " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[-3:]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["streaming_llm", "h2o", "snapkv", "tova", "corm", "attention_gate",
                                    "retaining_head", "layer_budget"])
def test_static_steps_never_read_the_device(method):
    """Left-padded batch, ragged budgets, generate-style masks: after the first decoding step (which moves the
    cache into its slots), no op reads a device value back on the host."""
    model = attach_method(tiny(1), method, **BUDGETS["ragged"])
    ids, mask, _ = prompts(3)
    cache = model.new_cache(decode=dict(static=True))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    spy = SyncSpy()
    with torch.no_grad():
        token = prefill(model, cache, ids, mask, positions).argmax(-1)
        last = positions[:, -1]
        for t in range(40):
            mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
            last = last + 1
            with spy if t > 0 else torch.no_grad():
                token = model(token[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache).logits
            token = token[:, -1].argmax(-1)
            assert cache.in_static
    assert not spy.calls, "host syncs in static decode steps:\n" + "\n".join(sorted(set(spy.calls)))


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,budgets", [("h2o", "ragged"), ("snapkv", "ragged"), ("attention_gate", "uniform"),
                                            ("tova", "uniform")])
def test_generate_static_equals_compacting(method, budgets):
    model = attach_method(tiny(2), method, **BUDGETS[budgets])
    ids, mask, _ = prompts(3)
    t0, l0, o0 = greedy(model, ids, mask, new=STEPS + 1, static_decode=False)
    t1, l1, o1 = greedy(model, ids, mask, new=STEPS + 1, static_decode=True)
    assert torch.equal(t0, t1) and max_diff(l0, l1) <= TOL
    assert all(layer.slots is None for layer in o1.cache.layers)  # returned in today's layout
    assert_same_sets(kept_sets(o0.cache), kept_sets(o1.cache), STEPS)
    assert o1.cache.tokens_seen == o0.cache.tokens_seen


def test_generate_rows_finishing_at_eos():
    model = attach_method(tiny(2), "h2o", **BUDGETS["ragged"])
    ids, mask, _ = prompts(3)
    tokens, _, _ = greedy(model, ids, mask, new=40, static_decode=False)
    eos = int(tokens[0, 5])  # row 0 stops early (maybe others too, later)
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                           pad_token_id=0, static_decode=s) for s in (False, True)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0][0, ids.shape[1] + 6:] == 0).all()  # row 0 is padded after its EOS


@pytest.mark.parametrize("budget", [12, 4096])
def test_beam_search_and_return_sequences(budget):
    model = attach_method(tiny(3), "h2o", budget=budget)
    ids, mask = left_pad([distinct_tokens(n, seed=50 + n) for n in (25, 14)])
    kw = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False,
              return_dict_in_generate=True, output_scores=True)
    a = model.generate(ids, static_decode=False, **kw)
    b = model.generate(ids, static_decode=True, **kw)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape == (4, ids.shape[1] + 12)
    assert max_diff(a.sequences_scores, b.sequences_scores) < TOL
    if budget == 4096:  # no eviction: the plain model's beams (invariant 1), in a buffer sized by the horizon
        trainkv.detach(model)
        plain = model.generate(ids, **kw)
        assert torch.equal(plain.sequences, b.sequences)
    else:
        assert b.cache.stats()["kept_per_layer_head"] == [[[12, 12]] * 6] * 2  # 2 prompts x 3 beams


def test_sampling_with_several_return_sequences():
    model = attach_method(tiny(4), "snapkv", budget=20)
    ids = distinct_tokens(30, seed=5)[None]
    outs = []
    for static in (False, True):
        torch.manual_seed(123)
        outs.append(model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=20, top_k=0,
                                   static_decode=static))
    assert outs[0].shape == (3, 50) and torch.equal(*outs)


# ---------------------------------------------------------------------------------------------------------
# fallbacks: today's step, one logged reason
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings,reason", [
    (dict(budget=24, mode="threshold", threshold=0.5), "threshold mode"),
    (dict(budget=24, evict_during_decoding=False), "evict_during_decoding=False"),
    (dict(budget=0.5), "ratio budget"),
    (dict(budget=24, head_allocation="adaptive", adaptive_floor=0.2), "Ada-KV"),
])
def test_unsupported_settings_fall_back_with_a_reason(settings, reason, caplog, monkeypatch):
    entered = []
    monkeypatch.setattr(sd.SlotState, "enter", classmethod(lambda cls, *a, **k: entered.append(1)))
    model = attach_method(tiny(1), "h2o", **settings)
    ids, mask, _ = prompts(3)
    with caplog.at_level(logging.INFO, logger="trainkv.decode"):
        t1, l1, _ = greedy(model, ids, mask, new=8, static_decode=True)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, static_decode=True)
    t0, l0, _ = greedy(model, ids, mask, new=8, static_decode=False)
    assert not entered and torch.equal(t0, t1) and max_diff(l0, l1) == 0
    lines = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(lines) == 1 and "static decode off" in lines[0]


def test_adaptive_split_that_cannot_move_stays_static():
    """Ada-KV with adaptive_floor=1: every head's safeguard is its whole share, the split is fixed, so it decodes
    statically, and equals the compacting step."""
    model = attach_method(tiny(1), "h2o", budget=24, head_allocation="adaptive",
                          adaptive_floor=1.0)
    decode_pair(model, *prompts(3), steps=20)


def test_cpu_graph_request_logs_why_it_runs_eagerly(caplog):
    model = attach_method(tiny(1), "streaming_llm", budget=24)
    with caplog.at_level(logging.INFO, logger="trainkv.decode"):
        model.generate(distinct_tokens(30, seed=1)[None], max_new_tokens=3, static_decode=True, cuda_graphs=True)
    assert any("CUDA graphs off" in r.getMessage() and "cpu" in r.getMessage() for r in caplog.records)


def test_decode_options_defaults(monkeypatch):
    monkeypatch.delenv(sd.ENV_STATIC, raising=False)
    monkeypatch.delenv(sd.ENV_GRAPHS, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    opts = sd.DecodeOptions()
    assert not opts.static_enabled(cpu) and opts.static_enabled(cuda)
    assert not opts.graphs_enabled(cpu) and opts.graphs_enabled(cuda) and opts.compile_enabled(cuda)
    assert not opts.merged(cuda_graphs=False).graphs_enabled(cuda)
    assert not opts.merged(static=False).graphs_enabled(cuda)
    monkeypatch.setenv(sd.ENV_STATIC, "1")
    assert opts.static_enabled(cpu)
    monkeypatch.setenv(sd.ENV_GRAPHS, "0")
    assert not opts.graphs_enabled(cuda)


# ---------------------------------------------------------------------------------------------------------
# the CUDA-graph runner (emulated on CPU: capture = one real step, replay = the step on the graph's tensors)
# ---------------------------------------------------------------------------------------------------------
def graphed_model(method="h2o", budgets="ragged", seed=2):
    model = attach_method(tiny(seed), method, **BUDGETS[budgets])
    model.trainkv_state.graphs = DecodeGraphs(emulate=True)
    return model


@pytest.mark.parametrize("method", ["h2o", "snapkv", "attention_gate", "corm"])
def test_graph_runner_equals_eager_and_is_reused(method):
    model = graphed_model(method)
    graphs = model.trainkv_state.graphs
    # the gate's ring buffer reaches its steady state once it holds gate_window real tokens: no padding there
    ids, mask, _ = prompts(1 if method == "attention_gate" else 3)
    t0, l0, o0 = greedy(model, ids, mask, new=STEPS, static_decode=False)
    t1, l1, o1 = greedy(model, ids, mask, new=STEPS, static_decode=True, cuda_graphs=True)
    assert torch.equal(t0, t1) and max_diff(l0, l1) <= TOL
    assert_same_sets(kept_sets(o0.cache), kept_sets(o1.cache), STEPS)
    assert graphs.stats["captures"] == 1 and graphs.stats["replays"] > 20
    # a second generate with the same shapes replays the same graph on the new cache's contents
    replays = graphs.stats["replays"]
    t2, l2, _ = greedy(model, ids[:, 5:], mask[:, 5:], new=STEPS, static_decode=True, cuda_graphs=True)
    t3, l3, _ = greedy(model, ids[:, 5:], mask[:, 5:], new=STEPS, static_decode=False)
    assert torch.equal(t2, t3) and max_diff(l2, l3) <= TOL
    assert graphs.stats["captures"] == 1 and graphs.stats["replays"] > replays + 20


def test_graph_runner_with_two_live_caches():
    """Two caches decoding in turns share one graph: each keeps its own contents (the one left behind gets copies)."""
    model = graphed_model("h2o", "uniform")
    ids, mask, _ = prompts(1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [model.new_cache(decode=dict(static=True, cuda_graphs=True)) for _ in range(2)]
    reference = model.new_cache()
    with torch.no_grad():
        outs = [prefill(model, c, ids, mask, positions) for c in (*caches, reference)]
        token, last = outs[-1].argmax(-1), positions[:, -1]
        for t in range(30):
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            last = last + 1
            kw = dict(attention_mask=mask, position_ids=last[:, None])
            outs = [model(input_ids=token[:, None], cache=c, **kw).logits[:, -1] for c in (*caches, reference)]
            assert max_diff(outs[0], outs[2]) <= TOL and max_diff(outs[1], outs[2]) <= TOL, t
            token = outs[-1].argmax(-1)
    assert model.trainkv_state.graphs.stats["replays"] > 20
    assert_same_sets(kept_sets(caches[0]), kept_sets(reference), 30)
    assert_same_sets(kept_sets(caches[1]), kept_sets(reference), 30)


def test_graph_capture_failure_falls_back_to_eager(caplog):
    model = graphed_model("h2o")
    graphs = model.trainkv_state.graphs

    def fail():
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs.capture_hook = fail
    ids, mask, _ = prompts(3)
    with caplog.at_level(logging.WARNING, logger="trainkv.decode"):
        t1, l1, _ = greedy(model, ids, mask, new=30, static_decode=True, cuda_graphs=True)
    t0, l0, _ = greedy(model, ids, mask, new=30, static_decode=False)
    assert torch.equal(t0, t1) and max_diff(l0, l1) <= TOL
    assert graphs.stats["captures"] == 0 and graphs.failed
    assert sum("capture failed" in r.getMessage() for r in caplog.records) == 1


def test_graph_unsafe_method_decodes_eagerly(caplog):
    model = graphed_model("random")
    ids, mask, _ = prompts(1)
    with caplog.at_level(logging.INFO, logger="trainkv.decode"):
        greedy(model, ids, mask, new=10, static_decode=True, cuda_graphs=True)
    assert model.trainkv_state.graphs.stats["captures"] == 0
    assert any("not graph-safe" in r.getMessage() for r in caplog.records)


def test_graph_runner_with_beam_search():
    """Beam search reorders the cache between steps: in place, so the graph keeps replaying on the same buffers."""
    model = graphed_model("h2o", "uniform")
    graphs = model.trainkv_state.graphs
    ids, mask = left_pad([distinct_tokens(n, seed=50 + n) for n in (40, 31)])
    kw = dict(attention_mask=mask, max_new_tokens=24, num_beams=3, num_return_sequences=2, do_sample=False,
              return_dict_in_generate=True, output_scores=True)
    a = model.generate(ids, static_decode=False, **kw)
    b = model.generate(ids, static_decode=True, cuda_graphs=True, **kw)
    assert torch.equal(a.sequences, b.sequences) and max_diff(a.sequences_scores, b.sequences_scores) < TOL
    assert graphs.stats["captures"] == 1 and graphs.stats["replays"] > 15
