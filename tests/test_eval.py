"""The evaluation harness (issue 3): prompts, budgets, the batched query-agnostic runner, result files,
summary table and plot, resuming, KL / perplexity, the ``trainkv eval`` command.

A tiny random Llama (built in code, with the SmolLM2 vocabulary) stands in for the model, so the
tests run on CPU in seconds; the tokenizer is the embedded SmolLM2-135M-Instruct one (offline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import trainkv
from trainkv.data.tasks import generate_samples
from trainkv.eval import report
from trainkv.eval.prompts import build_prompt, kvpress_row, prompt_texts
from trainkv.eval.quality import prose_segments, quality_batch
from trainkv.eval.runner import Sweep, SweepConfig, chunk_bounds, compression_of, evaluate_samples, run_batch
from trainkv.eval.spec import (
    NO_EVICTION_BUDGET, checkpoint_digest, eviction_settings, keep_entries, parse_keep, parse_method, protected_tokens,
)

CTX = 200  # target context tokens of the test samples


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and avoids oversubscription on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok():
    return trainkv.load_tokenizer("smollm2-135m")


def tiny_model(tok, seed: int = 0, sharp: float = 4.0):
    """A 2-layer random Llama (4 query heads, 2 KV heads) over the SmolLM2 vocabulary; peaked attention."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharp)
            layer.self_attn.k_proj.weight.mul_(sharp)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = 2
    return model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def samples(tok):
    return generate_samples("niah_single_1", tok, 2, CTX, seed=1234) + generate_samples("vt", tok, 1, CTX, seed=1234)


def attached(model, method="snapkv", chunk_size=64):
    return trainkv.attach(model, method, trainkv.EvictionConfig(budget=NO_EVICTION_BUDGET, chunk_size=chunk_size))


# ---------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_3", "niah_multiquery", "vt", "cwe", "fwe", "kv_retrieval"])
def test_context_is_a_token_prefix_of_the_full_prompt(tok, task):
    for sample in generate_samples(task, tok, 2, 300, seed=1234):
        p = build_prompt(sample, tok)
        ctx_text, q_text = prompt_texts(sample, tok)
        full = tok.encode(ctx_text + q_text, add_special_tokens=False)
        assert full[:len(p.context_ids)] == p.context_ids
        assert full == p.full_ids
        assert sample.context in tok.decode(p.context_ids)
        assert tok.decode(p.question_ids).endswith(sample.answer_prefix)
        assert sample.question not in tok.decode(p.context_ids)  # query-agnostic: the question is not compressed
        assert p.max_new_tokens == sample.max_new_tokens


def test_kvpress_row_reproduces_our_token_ids(tok, samples):
    """kvpress's pipeline preprocessing (copied logic) gives the same context and question ids."""
    for sample in samples:
        row = kvpress_row(sample)
        sep = "#" * (len(row["context"]) + 10)
        rendered = tok.apply_chat_template([{"role": "user", "content": row["context"] + sep}],
                                           add_generation_prompt=True, tokenize=False)
        context, suffix = rendered.split(sep)
        ctx_ids = tok.encode(context, add_special_tokens=False)
        q_ids = tok.encode(row["question"] + suffix + row["answer_prefix"], add_special_tokens=False)
        p = build_prompt(sample, tok)
        assert (ctx_ids, q_ids) == (p.context_ids, p.question_ids)
        assert set(row) == {"context", "question", "answer_prefix", "answer", "max_new_tokens", "task"}


# ---------------------------------------------------------------------------------------------------------
# budgets and protected tokens
# ---------------------------------------------------------------------------------------------------------
def test_budget_parsing_and_resolution():
    assert parse_keep("0.125") == 0.125 and isinstance(parse_keep("0.125"), float)
    assert parse_keep("64") == 64 and isinstance(parse_keep("64"), int)
    assert parse_keep("1/8") == 0.125
    assert parse_keep("1.0") == 1.0
    with pytest.raises(ValueError):
        parse_keep("1.5")
    assert keep_entries(0.125, 512) == 64
    assert keep_entries(0.0625, 1024) == 64
    assert keep_entries(0.5, 513) == 256  # round half to even of 256.5
    assert keep_entries(100, 512) == 100
    assert protected_tokens(32) == (4, 8)
    assert protected_tokens(64) == (4, 16)
    assert protected_tokens(256) == (4, 32)  # capped at 32
    assert protected_tokens(2) == (2, 0)
    assert protected_tokens(64, sink_tokens=0, recent_window=64) == (0, 64)
    ev = eviction_settings(64, None)
    assert ev["budget"] == 64 and ev["chunk_size"] >= 2**30  # one pass
    assert chunk_bounds(530, 512) == [(0, 18), (18, 530)]  # counted back from the end
    assert chunk_bounds(1024, 512) == [(0, 512), (512, 1024)]
    assert chunk_bounds(300, None) == [(0, 300)]


def test_parse_method():
    assert parse_method("full").is_full
    spec = parse_method("snapkv:window_size=64,kernel_size=7")
    assert spec.method == "snapkv" and dict(spec.overrides) == {"window_size": 64, "kernel_size": 7}
    assert parse_method("gate", {"gate": "some/path"}).checkpoint == "some/path"
    with pytest.raises(ValueError):
        parse_method("attention_gate")  # trainable: needs --checkpoint
    with pytest.raises(ValueError):
        parse_method("no_such_method")


@pytest.mark.parametrize("chunk_size", [64, None])
def test_kept_entries_and_measured_compression(tok, model, samples, chunk_size):
    prompts = [build_prompt(s, tok, max_new_tokens=2) for s in samples]
    budget = keep_entries(0.25, CTX)
    attached(model, "streaming_llm")
    try:
        out = run_batch(model, tok, prompts, eviction_settings(budget, chunk_size), chunk_size)
        full = run_batch(model, tok, prompts, None, chunk_size)
    finally:
        trainkv.detach(model)
    for p, o, f in zip(prompts, out, full):
        assert all(n == budget for layer in o["kept"] for n in layer)  # exactly the budget per (layer, head)
        assert compression_of(o["kept"], p.context_tokens)["compression"] == pytest.approx(budget / p.context_tokens)
        assert all(n == p.context_tokens for layer in f["kept"] for n in layer)  # full cache keeps everything
        assert compression_of(f["kept"], p.context_tokens)["compression"] == 1.0


def test_learned_allocation_uses_the_whole_budget_when_a_layer_share_exceeds_the_context(tok, model, samples):
    """Allocation weights giving layer 0 more than the context (Qwen's learned layer budgets did: 11,071 entries per
    head at 8K x 1/8): the runner tells the cache its horizon, so layer 0 is capped and layer 1 gets the rest. One
    prompt at a time: every row's context is the padded width, and the cap leaves only the question and answer
    tokens' slack."""
    prompt = build_prompt(samples[0], tok, max_new_tokens=2)
    budget = keep_entries(0.75, CTX)
    settings = {**eviction_settings(budget, 64), "allocation_weights": [[30.0, 30.0], [1.0, 1.0]]}
    attached(model, "streaming_llm")
    try:
        [out] = run_batch(model, tok, [prompt], settings, 64)
    finally:
        trainkv.detach(model)
    n = prompt.context_tokens
    cap = n + len(prompt.question_ids) + prompt.max_new_tokens
    uncapped = trainkv.EvictionConfig(**settings).budget_for(0, 2, n)
    assert uncapped[0] > cap > budget  # layer 0's uncapped share would exceed every token the cache sees
    assert out["kept"][0] == [n, n]  # all its tokens
    assert out["kept"][1] == [2 * budget - cap] * 2  # the rest of the total: only the horizon's slack is unused
    assert sum(map(sum, out["kept"])) == 4 * budget - 2 * (cap - n)


# ---------------------------------------------------------------------------------------------------------
# the runner: batched == unbatched, and == model.generate continuing the compressed cache
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["snapkv", "tova", "h2o", "streaming_llm"])
def test_batched_equals_unbatched(tok, model, samples, method):
    prompts = [build_prompt(s, tok, max_new_tokens=5) for s in samples]
    assert len({p.context_tokens for p in prompts}) > 1 and len({len(p.question_ids) for p in prompts}) > 1
    ev = eviction_settings(48, 64)
    attached(model, method)
    try:
        one = [run_batch(model, tok, [p], ev, 64)[0] for p in prompts]
        many = run_batch(model, tok, prompts, ev, 64)
    finally:
        trainkv.detach(model)
    for a, b in zip(one, many):
        assert a["tokens"] == b["tokens"]
        assert a["kept"] == b["kept"]


def test_runner_equals_generate_continuation(tok, model, samples):
    """Prefill the context with eviction, then ``model.generate(full_ids, cache=cache)`` gives the same tokens."""
    p = build_prompt(samples[0], tok, max_new_tokens=6)
    ev = eviction_settings(48, None)
    attached(model, "snapkv")
    try:
        ours = run_batch(model, tok, [p], ev, None)[0]
        cache = model.new_cache(ev)
        ids = torch.tensor([p.context_ids])
        with torch.no_grad():
            model(ids, cache=cache, logits_to_keep=1)
            cache.eviction_enabled = False
            full = torch.tensor([p.full_ids])
            out = model.generate(full, attention_mask=torch.ones_like(full), cache=cache, max_new_tokens=6,
                                 do_sample=False)
    finally:
        trainkv.detach(model)
    generated = out[0, full.shape[1]:].tolist()
    assert ours["tokens"] == generated[:len(ours["tokens"])]


# ---------------------------------------------------------------------------------------------------------
# the sweep: files, summary, plot, resume
# ---------------------------------------------------------------------------------------------------------
def _config(out, **kw):
    base = dict(model="tiny", methods=["full", "snapkv", "streaming_llm"], keep=[0.25, 0.125],
                tasks=["niah_single_1", "vt"], context_lengths=[CTX], samples=1, output=str(out), batch_size=2,
                chunk_size=64, max_new_tokens=3, progress=False)
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tok, model):
    out = tmp_path_factory.mktemp("sweep")
    Sweep(_config(out), model=model, tokenizer=tok).run()
    return out


def test_run_json_schema(sweep_dir):
    files = sorted((sweep_dir / "runs").glob("*.json"))
    names = {f.name for f in files}
    assert names == {f"full__L{CTX}__full.json"} | {f"{m}__L{CTX}__r{b}.json" for m in ("snapkv", "streaming_llm")
                                                     for b in ("0.25", "0.125")}
    for f in files:
        rec = json.loads(f.read_text())
        assert rec["schema"] == "trainkv.eval.run/1" and rec["kind"] == "tasks"
        assert rec["split"] == "eval" and rec["seed"] == 1234 and rec["eval_split"] == "adhoc"
        assert rec["config"]["seeds"] == [1234] and rec["config"]["eval_split"] == "adhoc"
        assert {"config", "results", "aggregate", "tokenizer", "versions", "device", "date", "timing"} <= set(rec)
        assert {"torch", "transformers", "trainkv"} <= set(rec["versions"])
        cfg = rec["config"]
        assert cfg["context_length"] == CTX and cfg["tasks"] == ["niah_single_1", "vt"]
        assert len(rec["results"]) == 2
        for r in rec["results"]:
            assert {"task", "prediction", "references", "score", "compression", "context_tokens",
                    "kept_mean", "seconds"} <= set(r)
            assert 0 <= r["score"] <= 100
        if cfg["method"]["method"] == "full":
            assert cfg["budget"]["entries"] is None and all(r["compression"] == 1.0 for r in rec["results"])
        else:
            entries = cfg["budget"]["entries"]
            assert entries == keep_entries(cfg["budget"]["spec"], CTX)
            assert cfg["eviction"]["budget"] == entries
            assert cfg["eviction"]["recent_window"] == min(32, entries // 4) and cfg["eviction"]["sink_tokens"] == 4
            for r in rec["results"]:
                assert r["kept_mean"] == entries
                assert r["compression"] == pytest.approx(entries / r["context_tokens"])


def test_summary_numbers_are_means_of_per_sample_scores(sweep_dir, tmp_path):
    """Give the samples known scores; the table and summary.json must show their means and ratios to full."""
    out = tmp_path / "copy"
    (out / "runs").mkdir(parents=True)
    fake = {"full": [100.0, 50.0], "snapkv": [50.0, 25.0], "streaming_llm": [0.0, 100.0]}
    for f in (sweep_dir / "runs").glob("*.json"):
        rec = json.loads(f.read_text())
        scores = fake[rec["config"]["method"]["label"]]
        if "0.125" in f.name:
            scores = [s / 2 for s in scores]
        for r, s in zip(rec["results"], scores):
            r["score"] = s
        (out / "runs" / f.name).write_text(json.dumps(rec))
    summary = report.write_report(out)
    full = summary["full"][str(CTX)]["score"]
    assert full == 75.0
    cell = summary["methods"]["snapkv"][str(CTX)]["r0.25"]
    assert cell["score"] == 37.5 and cell["relative"] == pytest.approx(50.0)
    assert summary["methods"]["streaming_llm"][str(CTX)]["r0.125"]["score"] == 25.0
    assert summary["methods"]["snapkv"][str(CTX)]["r0.25"]["per_task"] == {"niah_single_1": 50.0, "vt": 25.0}
    md = (out / "summary.md").read_text()
    # one sample per task: resampling within tasks cannot move the mean (the intervals have no width)
    assert "| snapkv | 37.5 [37.5, 37.5] (50% [50, 50]) | 18.8 [18.8, 18.8] (25% [25, 25]) |" in md
    assert "| full cache | 75.0 [75.0, 75.0] (100%) | 75.0 [75.0, 75.0] (100%) |" in md
    plain = report.markdown(report.summarize(report.load_records(out), intervals=False))
    assert "| snapkv | 37.5 (50%) | 18.8 (25%) |" in plain and "| full cache | 75.0 (100%) | 75.0 (100%) |" in plain
    assert json.loads((out / "summary.json").read_text())["methods"]["snapkv"][str(CTX)]["r0.25"]["score"] == 37.5


def test_summary_refuses_runs_of_another_dtype(sweep_dir, tmp_path):
    """One table compares like with like: a run in bfloat16 beside float32 runs is an error naming the fix."""
    out = tmp_path / "mixed"
    (out / "runs").mkdir(parents=True)
    for i, f in enumerate(sorted((sweep_dir / "runs").glob("*.json"))):
        rec = json.loads(f.read_text())
        rec["config"]["dtype"] = "bfloat16" if i == 1 else "float32"
        (out / "runs" / f.name).write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="has dtype 'bfloat16', the other runs 'float32'.*own --output folder"):
        report.write_report(out)


def test_plot_written(sweep_dir):
    png = sweep_dir / "accuracy_vs_budget.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (sweep_dir / "summary.md").exists() and (sweep_dir / "summary.json").exists()


def test_resume_skips_finished_runs(sweep_dir, tok, model, monkeypatch):
    before = {f.name: f.stat().st_mtime_ns for f in (sweep_dir / "runs").glob("*.json")}
    calls = []
    monkeypatch.setattr(Sweep, "run_one", lambda self, *a, **k: calls.append(a) or pytest.fail("recomputed"))
    Sweep(_config(sweep_dir), model=model, tokenizer=tok).run()
    assert calls == []
    assert {f.name: f.stat().st_mtime_ns for f in (sweep_dir / "runs").glob("*.json")} == before
    # a run file written with other settings is not silently reused
    with pytest.raises(RuntimeError, match="other settings"):
        Sweep(_config(sweep_dir, max_new_tokens=7), model=model, tokenizer=tok).run()


def test_a_killed_cell_resumes_from_its_finished_batches(tok, model, tmp_path, monkeypatch):
    """A cell killed after its first batch keeps that batch in `<run>.json.partial` (never read as a run); the next
    sweep computes only the other samples, and the record equals an uninterrupted run's, sample for sample."""
    import trainkv.eval.runner as runner

    whole = tmp_path / "whole"
    Sweep(_config(whole, methods=["snapkv"], keep=[0.25], samples=2), model=model, tokenizer=tok).run()
    ref = json.loads(next((whole / "runs").glob("*.json")).read_text())

    out = tmp_path / "killed"
    real, calls = runner.run_batch, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        Sweep(_config(out, methods=["snapkv"], keep=[0.25], samples=2), model=model, tokenizer=tok).run()
    assert not list((out / "runs").glob("*.json"))
    partial = next((out / "runs").glob("*.json.partial"))
    assert len(json.loads(partial.read_text())["results"]) == 2

    calls.clear()
    monkeypatch.setattr(runner, "run_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    Sweep(_config(out, methods=["snapkv"], keep=[0.25], samples=2), model=model, tokenizer=tok).run()
    assert calls == [2]  # 4 samples in batches of 2: only the second batch is computed again
    rec = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert not list((out / "runs").glob("*.partial"))
    assert rec["timing"]["resumed_samples"] == 2 and ref["timing"]["resumed_samples"] == 0
    keys = ("task", "index", "prediction", "score", "kept_mean")
    assert [{k: r[k] for k in keys} for r in rec["results"]] == [{k: r[k] for k in keys} for r in ref["results"]]

    # a partial file from other settings is not used
    write_json = runner.write_json
    write_json(partial, {"config": {**rec["config"], "seed": 99}, "results": {"0": rec["results"][0]}})
    sweep = Sweep(_config(out, methods=["snapkv"], keep=[0.25], samples=2), model=model, tokenizer=tok)
    assert sweep.load_partial(partial, rec["config"]) == {}
    write_json(partial, {"config": rec["config"], "results": {"0": rec["results"][0]}})
    assert sweep.load_partial(partial, rec["config"]) == {0: rec["results"][0]}


def test_checkpoint_methods_load_through_hub(tok, model, tmp_path, monkeypatch):
    import trainkv.hub

    seen = {}

    def fake_load_gated(path, model=None, **overrides):
        seen.update(path=path, overrides=overrides)
        return trainkv.attach(model, "tova", trainkv.EvictionConfig(**overrides))

    monkeypatch.setattr(trainkv.eval.runner, "load_gated", fake_load_gated)
    monkeypatch.setattr(Sweep, "recent_window", lambda self, spec, entries: None)  # no checkpoint to read
    cfg = _config(tmp_path, methods=["gate"], checkpoints={"gate": "ckpt/dir"}, keep=[0.25], tasks=["niah_single_1"])
    Sweep(cfg, model=model, tokenizer=tok).run()
    assert seen["path"] == "ckpt/dir"
    rec = json.loads((tmp_path / "runs" / f"gate__L{CTX}__r0.25.json").read_text())
    assert rec["config"]["method"]["checkpoint"] == "ckpt/dir"
    assert rec["config"]["method_config"]["method"]["method"] == "tova"
    assert not hasattr(model, "trainkv_state")  # detached again


def test_checkpoint_stabilizers_set_the_recent_window(tok, model, tmp_path):
    """Locret's stabilizers (a fraction of the budget) come from the checkpoint's config unless --recent-window."""
    import shutil

    ckpt = tmp_path / "heads"
    shutil.copytree(Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m" / "retaining_head", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["method"]["stabilizers"] = 0.5
    (ckpt / "config.json").write_text(json.dumps(config))
    cfg = _config(tmp_path / "out", methods=["heads", "snapkv"], checkpoints={"heads": str(ckpt)}, keep=[0.25])
    sweep = Sweep(cfg, model=model, tokenizer=tok)
    heads, snapkv = cfg.method_specs()
    assert sweep.recent_window(heads, 256) == 128 and sweep.recent_window(heads, 64) == 32
    assert sweep.recent_window(snapkv, 256) is None
    samples = sweep.samples(CTX)
    assert sweep.run_config(heads, CTX, 0.25, samples)["eviction"]["recent_window"] == CTX // 8  # half of 1/4
    assert sweep.run_config(snapkv, CTX, 0.25, samples)["eviction"]["recent_window"] == min(32, CTX // 16)
    explicit = Sweep(_config(tmp_path / "o2", methods=["heads"], checkpoints={"heads": str(ckpt)}, keep=[0.25],
                             recent_window=8), model=model, tokenizer=tok)
    assert explicit.run_config(heads, CTX, 0.25, samples)["eviction"]["recent_window"] == 8


# ---------------------------------------------------------------------------------------------------------
# KL / perplexity
# ---------------------------------------------------------------------------------------------------------
def test_kl_zero_without_eviction_positive_with(tok, model):
    segs = prose_segments(tok, 160, 2)
    assert len(segs) == 2 and all(len(s) == 160 for s in segs)
    ids = torch.tensor(segs)
    attached(model, "snapkv")
    try:
        big, small = eviction_settings(160, 32), eviction_settings(40, 32)
        res = quality_batch(model, ids, [big, small], 32, [0, 40])
    finally:
        trainkv.detach(model)
    no_evict, evict = res
    assert max(no_evict["kl_all_sum"]) < 1e-6 * no_evict["positions_all"]
    assert no_evict["nll_sum"] == pytest.approx(no_evict["nll_full_sum"], rel=1e-6)
    assert min(evict["kl_sum"]) > 1e-4
    assert evict["positions"] == 160 - 1 - 40 and evict["positions_all"] == 160


def test_kl_in_sweep(tmp_path, tok, model, monkeypatch):
    cfg = _config(tmp_path, methods=["full", "streaming_llm"], keep=[0.25], context_lengths=[128],
                  tasks_enabled=False, kl=True, kl_samples=1, kl_chunk_size=32)
    summary = Sweep(cfg, model=model, tokenizer=tok).run()
    q = summary["quality"]
    assert q["full"]["128"]["full"]["kl"] == 0.0
    cell = q["streaming_llm"]["128"]["r0.25"]
    assert cell["kl"] > 0 and cell["positions"] == 128 - 1 - 32 and cell["ppl"] > 0
    assert (tmp_path / "kl_vs_budget.png").exists()
    # resumable too: a second run recomputes nothing
    import trainkv.eval.quality as quality

    monkeypatch.setattr(quality, "quality_batch", lambda *a, **k: pytest.fail("recomputed"))
    assert Sweep(cfg, model=model, tokenizer=tok).run()["quality"] == q


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def test_eval_cli_parser():
    from trainkv.cli import build_parser
    from trainkv.cli.eval import config_from_args

    args = build_parser().parse_args([
        "eval", "--methods", "full", "snapkv", "gate", "--checkpoint", "gate=checkpoints/x/attention_gate",
        "--keep", "0.5", "1/8", "64", "--tasks", "ruler", "--context-lengths", "512", "1024", "--samples", "3",
        "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "4", "--chunk-size", "none", "--output", "o",
    ])
    assert args.func.__name__ == "cmd_eval"
    cfg = config_from_args(args)
    assert cfg.keep == [0.5, 0.125, 64] and cfg.chunk_size is None and cfg.dtype == "bfloat16"
    assert len(cfg.tasks) == 11 and cfg.seed == 1234 and cfg.batch_size == 4
    assert cfg.eval_split == "adhoc" and cfg.seeds == (1234,)
    assert [s.label for s in cfg.method_specs()] == ["full", "snapkv", "gate"]
    assert cfg.method_specs()[2].checkpoint == "checkpoints/x/attention_gate"
    default = config_from_args(build_parser().parse_args(["eval"]))
    assert default.methods[0] == "full" and set(trainkv.TRAINING_FREE) <= set(default.methods)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "no-equals-sign"])
    assert isinstance(args, argparse.Namespace)


def test_evaluate_samples_scores_and_order(tok, model, samples):
    attached(model, "streaming_llm")
    try:
        res = evaluate_samples(model, tok, samples, eviction=eviction_settings(64, 64), chunk_size=64, batch_size=3,
                               max_new_tokens=2)
    finally:
        trainkv.detach(model)
    assert [r["task"] for r in res] == [s.task for s in samples]
    assert [r["references"] for r in res] == [s.answers for s in samples]
    assert all(r["generated_tokens"] <= 2 and r["batch"] == 3 for r in res)


def test_report_only_command(sweep_dir, capsys):
    from trainkv.cli import main

    assert main(["eval", "--report-only", "--output", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "| full cache |" in out and "| snapkv |" in out


def test_kvpress_reference_compare(sweep_dir, tmp_path):
    """The kvpress comparison reads run files of both sides (here: trainkv's, relabelled) and pairs them."""
    from benchmark_loader import load_benchmark

    mod = load_benchmark("kvpress_reference")
    for side, suffix in (("kvpress", ""), ("trainkv", "=kvpress")):
        (tmp_path / side / "runs").mkdir(parents=True)
        for f in (sweep_dir / "runs").glob("*.json"):
            rec = json.loads(f.read_text())
            m = rec["config"]["method"]["label"]
            rec["config"]["method"]["label"] = f"{side}:{m}" + ("" if m == "full" else suffix)
            (tmp_path / side / "runs" / f.name).write_text(json.dumps(rec))
    table = mod.compare_table(tmp_path / "kvpress", tmp_path / "trainkv")
    assert "| full | full |" in table and "| snapkv | r0.25 |" in table and "2/2" in table
    assert mod.budget_entries(0.125, 1024) == 128 and mod.string_match("all", "a 12 b", ["12", "13"]) == 50.0


def test_checkpoint_runs_are_keyed_by_weights_not_path(tmp_path):
    """A checkpoint retrained in place must not reuse (or be reported under) the old weights' cells."""
    from safetensors.torch import save_file


    ckpt = tmp_path / "gates"
    ckpt.mkdir()
    save_file({"w": torch.zeros(4)}, str(ckpt / "model.safetensors"))
    first = parse_method("mine", {"mine": str(ckpt)}).to_dict()
    assert first["weights_sha256"] == checkpoint_digest(str(ckpt)) and len(first["weights_sha256"]) == 16
    save_file({"w": torch.ones(4)}, str(ckpt / "model.safetensors"))
    second = parse_method("mine", {"mine": str(ckpt)}).to_dict()
    assert second["checkpoint"] == first["checkpoint"] and second["weights_sha256"] != first["weights_sha256"]
    assert parse_method("mine", {"mine": "org/some-hub-repo"}).to_dict()["weights_sha256"] is None
    assert "weights_sha256" not in parse_method("snapkv").to_dict()


# ---------------------------------------------------------------------------------------------------------
# dev / test splits, run-time settings of a checkpoint, task families (issue 17)
# ---------------------------------------------------------------------------------------------------------
def test_split_seeds_and_recorded_split():
    from trainkv.eval.spec import DEFAULT_SEED, DEV_SEEDS, TEST_SEED, record_split, resolve_split

    assert resolve_split("dev") == ("dev", DEV_SEEDS) and resolve_split("test") == ("test", (TEST_SEED,))
    assert resolve_split() == ("adhoc", (DEFAULT_SEED,)) and resolve_split(None, 99) == ("adhoc", (99,))
    assert resolve_split(None, TEST_SEED) == ("test", (TEST_SEED,))  # the test seed is test, however it was asked
    assert resolve_split(None, DEV_SEEDS[0]) == ("adhoc", (DEV_SEEDS[0],))  # a dev cell pools every dev seed
    assert resolve_split("dev", DEV_SEEDS[1]) == ("dev", DEV_SEEDS)
    with pytest.raises(ValueError, match="other sample set"):
        resolve_split("dev", 5)
    with pytest.raises(ValueError):
        resolve_split("train")
    assert TEST_SEED not in DEV_SEEDS and DEFAULT_SEED not in (*DEV_SEEDS, TEST_SEED)
    old = {"config": {"seed": 1234, "split": "eval"}, "results": [{"seed": 1234}]}  # a pre-protocol file
    assert record_split(old) == "adhoc"
    sneaky = {"config": {"seed": 5, "eval_split": "dev"}, "results": [{"seed": TEST_SEED}]}
    assert record_split(sneaky) == "test"  # any test-seed sample makes a test run
    assert record_split({"config": {"seeds": list(DEV_SEEDS), "eval_split": "dev"}, "results": []}) == "dev"
    assert record_split({"config": {"seeds": [1234], "eval_split": "dev"}, "results": []}) == "adhoc"  # not dev seeds


def test_dev_split_pools_every_dev_seed(tok, model, tmp_path):
    from trainkv.eval.spec import DEV_SEEDS

    cfg = _config(tmp_path, methods=["full", "streaming_llm"], keep=[0.25], tasks=["niah_single_1"], split="dev")
    summary = Sweep(cfg, model=model, tokenizer=tok).run()
    rec = json.loads((tmp_path / "runs" / f"streaming_llm__L{CTX}__r0.25.json").read_text())
    assert rec["eval_split"] == "dev" and rec["config"]["seeds"] == list(DEV_SEEDS) == rec["config"]["seed"]
    assert [r["seed"] for r in rec["results"]] == list(DEV_SEEDS) and len(rec["results"]) == len(DEV_SEEDS)
    assert summary["eval_split"] == "dev" and summary["seeds"] == list(DEV_SEEDS)
    assert "dev split, seeds 4321, 777, 2024" in (tmp_path / "summary.md").read_text()
    # the same folder resumes; another split into it is refused rather than mixed
    Sweep(cfg, model=model, tokenizer=tok).run()
    with pytest.raises(RuntimeError, match="other settings"):
        Sweep(_config(tmp_path, methods=["streaming_llm"], keep=[0.25], tasks=["niah_single_1"], split="test"),
              model=model, tokenizer=tok).run()


def test_old_run_files_still_resume_and_report(sweep_dir, tok, model, tmp_path, monkeypatch):
    """Files written before the protocol (no seeds / eval_split) are reused as ad-hoc runs and still report."""
    out = tmp_path / "old"
    (out / "runs").mkdir(parents=True)
    for f in (sweep_dir / "runs").glob("*.json"):
        rec = json.loads(f.read_text())
        for key in ("seeds", "eval_split"):
            rec["config"].pop(key)
        rec.pop("eval_split")
        (out / "runs" / f.name).write_text(json.dumps(rec))
    monkeypatch.setattr(Sweep, "run_one", lambda self, *a, **k: pytest.fail("recomputed"))
    summary = Sweep(_config(out), model=model, tokenizer=tok).run()
    assert summary["eval_split"] == "adhoc" and summary["full"][str(CTX)]["n"] == 2


def test_family_tasks_and_checkpoint_settings(tmp_path, tok, model):
    from trainkv.data.tasks import TASK_FAMILIES, TASKS
    from trainkv.eval.spec import expand_tasks

    assert expand_tasks(["family:aggregation"]) == ["cwe", "fwe"]
    assert sorted(t for ts in TASK_FAMILIES.values() for t in ts) == sorted(TASKS)  # every task in one family
    with pytest.raises(ValueError, match="unknown task family"):
        expand_tasks(["family:nope"])
    spec = parse_method("locret:pool_kernel=1,stabilizers=0.5", {"locret": "ckpt"})
    assert spec.checkpoint == "ckpt" and dict(spec.overrides) == {"pool_kernel": 1, "stabilizers": 0.5}
    assert spec.label == "locret:pool_kernel=1,stabilizers=0.5"


def test_checkpoint_run_time_settings_replace_the_checkpoints(tok, model, tmp_path):
    """``NAME:pool_kernel=1,stabilizers=0.5`` runs the same weights with those settings (and records them)."""
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m" / "retaining_head"
    cfg = _config(tmp_path, methods=["heads:pool_kernel=1,stabilizers=0.5"], checkpoints={"heads": str(ckpt)},
                  keep=[0.25], tasks=["niah_single_1"])
    sweep = Sweep(cfg, model=model, tokenizer=tok)
    (spec,) = cfg.method_specs()
    assert sweep.recent_window(spec, 256) == 128  # the override, not the checkpoint's 32
    from trainkv.eval.runner import checkpoint_with_settings
    from trainkv.hub.format import read_config

    with checkpoint_with_settings(str(ckpt), {"pool_kernel": 5}) as path:
        cfg2 = read_config(Path(path))
        assert cfg2["method"]["pool_kernel"] == 5 and cfg2["weights_sha256"] == read_config(ckpt)["weights_sha256"]
    assert not Path(path).exists()
    record = spec.to_dict()
    assert record["overrides"] == {"pool_kernel": 1, "stabilizers": 0.5} and record["weights_sha256"]


def test_compare_prints_paired_claims(sweep_dir, capsys):
    from trainkv.cli import main

    runs = sweep_dir / "runs"
    assert main(["eval", "--compare", str(runs / f"snapkv__L{CTX}__r0.25.json"), str(runs / f"full__L{CTX}__full.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("snapkv keeps") and "of full at 200 x 1/4 (n=2;" in out[0]
    assert out[1].startswith("snapkv - full at 200 x 1/4:")
    assert main(["eval", "--compare", str(runs / f"snapkv__L{CTX}__r0.25.json"), str(runs / f"full__L{CTX}__full.json"),
                 "--tasks", "vt"]) == 0
    assert "(n=1;" in capsys.readouterr().out
