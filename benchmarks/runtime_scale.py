"""GPU runtime benchmarks (issue 8): memory and speed of long prefill + decoding, full cache vs trainkv.

    python benchmarks/runtime_scale.py prefill  --contexts 32768 131072 524288 1048576 --budgets 4096
    python benchmarks/runtime_scale.py decode   --context 32768 --budget 2048 --generate-tokens 128
    python benchmarks/runtime_scale.py overhead --context 32768 --chunk 4096 --profile
    python benchmarks/runtime_scale.py smollm2  --contexts 8192 32768 131072      (real weights, see smollm2.py)

The 8B figures use the exact Llama-3.1-8B config with random bf16 weights (speed and memory do not
depend on weight values); the Attention-Gate modules are untrained (random) for the same reason.
`smollm2` uses SmolLM2-135M-Instruct's real weights and the shipped gates. Sub-commands also run on
CPU at tiny sizes (smoke checks; no memory figures there).
Each sub-command writes one JSON file (device, versions, date) to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse

import overhead
import smollm2
import torch
from common import bench_model, write_result
from generation import (
    cleanup, decode_rate, fill_evicting_cache, fill_full_cache, kv_bytes_per_token, prefill_and_decode, sweep_batches,
    weights_gib,
)

import trainkv


def cap_memory(gib: float | None) -> dict | None:
    """Let this process allocate at most ``gib`` GiB of the GPU (torch's caching allocator raises OutOfMemoryError
    beyond it): a smaller card, simulated on a large one."""
    if gib is None or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, 0)
    return {"cap_gib": gib, "device_total_gib": round(total / 2**30, 2),
            "how": "torch.cuda.set_per_process_memory_fraction(cap / total)"}


def guarded(run) -> dict:
    """A measurement, or {"oom": True} when it does not fit (the cap, or the card)."""
    try:
        return run()
    except torch.OutOfMemoryError as e:
        cleanup()
        return {"oom": True, "error": str(e).splitlines()[0][:200]}


def cmd_prefill(args):
    cap = cap_memory(args.memory_cap_gib)
    model = bench_model(args.smoke, max_positions=max(args.contexts) + args.new_tokens + 16)
    per_token = kv_bytes_per_token(model)
    rows = []
    method = args.method
    trainkv.attach(model, method, trainkv.EvictionConfig(budget=args.budgets[0], chunk_size=args.chunk,
                                                          sink_tokens=4, recent_window=args.window))
    prefill_and_decode(model, min(8192, min(args.contexts)), 4, args.chunk, lambda: model.new_cache())  # warm-up
    for context in args.contexts:
        row = {"context": context, "full_cache_kv_gib_computed": round(per_token * context / 2**30, 2),
               "full_cache_total_gib_computed": round(weights_gib(model) + per_token * context / 2**30, 2)}
        for budget in args.budgets:
            cfg = model.trainkv_state.eviction.replace(budget=budget)
            res = guarded(lambda: prefill_and_decode(model, context, args.new_tokens, args.chunk,
                                                     lambda: model.new_cache(cfg)))
            row[f"trainkv_{method}_budget{budget}"] = res
            print(context, budget, res, flush=True)
        if context <= args.full_cache_max:
            trainkv.detach(model)
            res = guarded(lambda: prefill_and_decode(model, context, args.new_tokens, args.chunk, lambda: None))
            row["full_cache_measured"] = res
            print(context, "full", res, flush=True)
            cleanup()
            trainkv.attach(model, method, trainkv.EvictionConfig(budget=args.budgets[0], chunk_size=args.chunk,
                                                                  sink_tokens=4, recent_window=args.window))
        rows.append(row)
        write_prefill(args, model, method, per_token, rows, cap)  # partial: a stopped run keeps its rows


def write_prefill(args, model, method, per_token, rows, cap) -> None:
    write_result(args.name or "prefill_8b", {
        "what": "prefill + decode, Llama-3.1-8B config, random bf16 weights, batch 1",
        "memory_cap": cap,
        "model": model.config.trainkv_base_model,
        "method": method, "chunk": args.chunk, "recent_window": args.window,
        "weights_gib": round(weights_gib(model), 2), "kv_bytes_per_token_full": per_token, "rows": rows,
    })


def cmd_decode(args):
    model = bench_model(args.smoke, max_positions=max(args.context, args.generate_context) + args.generate_tokens + 1024)
    eviction = trainkv.EvictionConfig(budget=args.budget, chunk_size=args.chunk, sink_tokens=4, recent_window=args.window)
    generate_rows = {}
    if args.generate_tokens:  # batch 1 through generate: prefill, then decoding with eviction every step
        for label in ("trainkv", "full_cache"):
            if label == "trainkv":
                trainkv.attach(model, args.method, eviction)
            make = (lambda: model.new_cache()) if label == "trainkv" else (lambda: None)
            prefill_and_decode(model, min(4096, args.generate_context), 4, args.chunk, make)  # warm-up
            generate_rows[label] = prefill_and_decode(model, args.generate_context, args.generate_tokens, args.chunk, make)
            print("generate batch 1", label, generate_rows[label], flush=True)
            if label == "trainkv":
                trainkv.detach(model)
            cleanup()
    full = sweep_batches(lambda b: decode_rate(model, fill_full_cache(model, b, args.context), b, args.context, args.steps),
                         args.full_batches)
    write_decode(args, model, full, [], generate_rows)  # partial: something survives a timeout
    trainkv.attach(model, args.method, eviction)
    evict = sweep_batches(
        lambda b: decode_rate(model, fill_evicting_cache(model, b, args.context, args.budget), b, args.context, args.steps),
        args.trainkv_batches)
    write_decode(args, model, full, evict, generate_rows)


def write_decode(args, model, full: list, evict: list, generate_rows: dict) -> None:
    best_full, best_evict = (full[-1] if full else None), (evict[-1] if evict else None)
    write_result(args.name or "decode_8b", {
        "what": f"decode throughput at a {args.context}-token context: one-token forwards on caches filled with random "
                "K/V of the right size (prefill not included), every candidate batch up to the largest that fits; "
                "plus, at batch 1, generate() after a real chunked prefill (decode_tokens_per_s). Llama-3.1-8B config, "
                "random bf16 weights, untrained gates",
        "model": model.config.trainkv_base_model,
        "context": args.context, "budget": args.budget, "method": args.method, "chunk": args.chunk,
        "full_cache": best_full, "trainkv": best_evict,
        "speedup": round(best_evict["tokens_per_s"] / best_full["tokens_per_s"], 2) if best_full and best_evict else None,
        "batch_sweep": {"full_cache": full, "trainkv": evict},
        "generate_batch1": {"context": args.generate_context, "new_tokens": args.generate_tokens, **generate_rows}
        if generate_rows else None,
    })


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prefill")
    a.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    a.add_argument("--budgets", type=int, nargs="+", default=[4096])
    a.add_argument("--chunk", type=int, default=4096)
    a.add_argument("--window", type=int, default=64)
    a.add_argument("--new-tokens", type=int, default=256)
    a.add_argument("--method", default="attention_gate")
    a.add_argument("--full-cache-max", type=int, default=131072)
    a.add_argument("--memory-cap-gib", type=float, default=None,
                   help="allocate at most this much GPU memory (e.g. 22: does it fit a 24 GB card?)")
    a.add_argument("--name", default=None)
    a.add_argument("--smoke", action="store_true", help="tiny random model on CPU: check the command runs")
    a.set_defaults(func=cmd_prefill)
    d = sub.add_parser("decode")
    d.add_argument("--context", type=int, default=32768)
    d.add_argument("--budget", type=int, default=2048)
    d.add_argument("--window", type=int, default=64)
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--method", default="attention_gate")
    d.add_argument("--chunk", type=int, default=4096, help="prefill chunk of the generate run")
    d.add_argument("--full-batches", type=int, nargs="+", default=[1, 8, 12, 14, 16, 20, 24, 28, 32])
    d.add_argument("--trainkv-batches", type=int, nargs="+", default=[1, 64, 128, 192, 256, 320, 384, 448, 512])
    d.add_argument("--generate-context", type=int, default=32768)
    d.add_argument("--generate-tokens", type=int, default=0, help="also time batch-1 generate() (0: skip)")
    d.add_argument("--name", default=None)
    d.add_argument("--smoke", action="store_true", help="tiny random model on CPU: check the command runs")
    d.set_defaults(func=cmd_decode)
    overhead.add_parser(sub)
    smollm2.add_parser(sub)
    args = p.parse_args()
    torch.manual_seed(0)
    args.func(args)


if __name__ == "__main__":
    main()
