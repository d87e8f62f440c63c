"""GPU runtime benchmarks (issue 8): memory and speed of long prefill + decoding, full cache vs trainkv.

    python benchmarks/runtime_scale.py prefill  --contexts 32768 131072 524288 1048576 --budgets 4096
    python benchmarks/runtime_scale.py decode   --context 32768 --budget 2048
    python benchmarks/runtime_scale.py overhead --context 32768 --chunk 4096
    python benchmarks/runtime_scale.py smollm2  --contexts 32768 131072

The 8B figures use the exact Llama-3.1-8B config with random bf16 weights (speed and memory do not
depend on weight values); the Attention-Gate modules are untrained (random) for the same reason.
Each sub-command writes one JSON file (device, versions, date) to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import environment, llama31_8b_random, measure, write_result  # noqa: F401

import trainkv
from trainkv.cache import EvictingCache


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def weights_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()


def run_generate(model, ids, new_tokens: int, chunk: int, cache=None) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=chunk)
    if cache is not None:
        kwargs["cache"] = cache
    with torch.no_grad(), measure() as m:
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return m


def prefill_and_decode(model, context: int, new_tokens: int, chunk: int, make_cache) -> dict:
    """Peak memory and time of prefill + ``new_tokens``; prefill time from a separate 1-token run."""
    ids = torch.randint(100, 20000, (1, context), device="cuda")
    first = run_generate(model, ids, 1, chunk, make_cache())
    cleanup()
    full = run_generate(model, ids, new_tokens, chunk, make_cache())
    cleanup()
    decode_s = max(1e-9, full["seconds"] - first["seconds"])
    return {
        "context": context,
        "new_tokens": new_tokens,
        "prefill_seconds": round(first["seconds"], 3),
        "prefill_tokens_per_s": round(context / first["seconds"], 1),
        "total_seconds": round(full["seconds"], 3),
        "decode_tokens_per_s": round((new_tokens - 1) / decode_s, 2),
        "peak_gib": round(max(first["peak_gib"], full["peak_gib"]), 3),
    }


def cmd_prefill(args):
    model = llama31_8b_random(max_positions=max(args.contexts) + args.new_tokens + 16)
    per_token = kv_bytes_per_token(model)
    rows = []
    method = args.method
    trainkv.attach(model, method, trainkv.EvictionConfig(budget=args.budgets[0], chunk_size=args.chunk,
                                                          sink_tokens=4, recent_window=args.window))
    prefill_and_decode(model, 8192, 4, args.chunk, lambda: model.new_cache())  # warm-up (kernels, allocator)
    for context in args.contexts:
        row = {"context": context, "full_cache_kv_gib_computed": round(per_token * context / 2**30, 2),
               "full_cache_total_gib_computed": round(weights_gib(model) + per_token * context / 2**30, 2)}
        for budget in args.budgets:
            cfg = model.trainkv_state.eviction.replace(budget=budget)
            res = prefill_and_decode(model, context, args.new_tokens, args.chunk, lambda: model.new_cache(cfg))
            row[f"trainkv_{method}_budget{budget}"] = res
            print(context, budget, res, flush=True)
        if context <= args.full_cache_max:
            trainkv.detach(model)
            try:
                res = prefill_and_decode(model, context, args.new_tokens, args.chunk, lambda: None)
            except torch.OutOfMemoryError:
                res = {"oom": True}
            row["full_cache_measured"] = res
            print(context, "full", res, flush=True)
            cleanup()
            trainkv.attach(model, method, trainkv.EvictionConfig(budget=args.budgets[0], chunk_size=args.chunk,
                                                                  sink_tokens=4, recent_window=args.window))
        rows.append(row)
    write_result(args.name or "prefill_8b", {
        "what": "prefill + decode, Llama-3.1-8B config, random bf16 weights, batch 1",
        "method": method, "chunk": args.chunk, "recent_window": args.window,
        "weights_gib": round(weights_gib(model), 2), "kv_bytes_per_token_full": per_token, "rows": rows,
    })


def fill_full_cache(model, batch: int, context: int):
    from transformers import DynamicCache

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, context, head_dim, device="cuda", dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def fill_evicting_cache(model, batch: int, context: int, budget: int):
    """An EvictingCache that has seen ``context`` tokens and holds ``budget`` entries per head (random K/V)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = model.new_cache(model.trainkv_state.eviction.replace(budget=budget))
    positions = torch.linspace(0, context - 1, budget, device="cuda").long()
    for layer in cache.layers:
        k = torch.randn(batch, cfg.num_key_value_heads, budget, head_dim, device="cuda", dtype=torch.bfloat16)
        layer.lazy_initialization(k, k)
        layer.keys, layer.values = k, torch.randn_like(k)
        layer.positions = positions.expand(batch, cfg.num_key_value_heads, budget).contiguous()
        layer.scores = torch.randn(batch, cfg.num_key_value_heads, budget, device="cuda")
        layer.seen = context
    return cache


def decode_rate(model, cache, batch: int, context: int, steps: int) -> dict:
    token = torch.randint(100, 20000, (batch, 1), device="cuda")
    mask = torch.ones(batch, context + steps + 1, device="cuda", dtype=torch.long)
    with torch.no_grad():
        for i in range(3):  # warm-up
            model(input_ids=token, cache=cache, attention_mask=mask[:, : context + i + 1],
                  position_ids=torch.full((batch, 1), context + i, device="cuda"), logits_to_keep=1)
        with measure() as m:
            for i in range(3, steps + 3):
                model(input_ids=token, cache=cache, attention_mask=mask[:, : context + i + 1],
                      position_ids=torch.full((batch, 1), context + i, device="cuda"), logits_to_keep=1)
    return {"batch": batch, "steps": steps, "seconds": round(m["seconds"], 3),
            "tokens_per_s": round(batch * steps / m["seconds"], 1), "peak_gib": round(m["peak_gib"], 2)}


def largest_batch(try_batch, candidates):
    best = None
    for b in candidates:
        try:
            best = try_batch(b)
            print(best, flush=True)
        except torch.OutOfMemoryError:
            cleanup()
            break
        cleanup()
    return best


def cmd_decode(args):
    model = llama31_8b_random(max_positions=args.context + 1024)
    full = largest_batch(lambda b: decode_rate(model, fill_full_cache(model, b, args.context), b, args.context, args.steps),
                         args.full_batches)
    trainkv.attach(model, args.method, trainkv.EvictionConfig(budget=args.budget, chunk_size=512, sink_tokens=4,
                                                               recent_window=args.window))
    evict = largest_batch(
        lambda b: decode_rate(model, fill_evicting_cache(model, b, args.context, args.budget), b, args.context, args.steps),
        args.trainkv_batches)
    write_result(args.name or "decode_8b", {
        "what": "decode throughput at a 32K context with the largest batch that fits; caches filled with random K/V "
                "of the right size (prefill is not part of this figure); Llama-3.1-8B config, random bf16 weights",
        "context": args.context, "budget": args.budget, "method": args.method,
        "full_cache": full, "trainkv": evict,
        "speedup": round(evict["tokens_per_s"] / full["tokens_per_s"], 2) if full and evict else None,
    })


def cmd_overhead(args):
    model = llama31_8b_random(max_positions=args.context + 64) if args.model == "llama3.1-8b" else \
        trainkv.load_model(args.model, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(100, 20000, (1, args.context), device="cuda")
    out = {}
    for method in ("streaming_llm", "attention_gate"):
        trainkv.attach(model, method, trainkv.EvictionConfig(budget=args.budget, chunk_size=args.chunk,
                                                              sink_tokens=4, recent_window=args.window))
        times = []
        for _ in range(args.repeats + 1):
            times.append(run_generate(model, ids, 1, args.chunk, model.new_cache())["seconds"])
            cleanup()
        out[method] = {"prefill_seconds": sorted(times[1:])[len(times[1:]) // 2], "all": times}
        trainkv.detach(model)
    times = []
    for _ in range(args.repeats + 1):
        times.append(run_generate(model, ids, 1, args.chunk)["seconds"])
        cleanup()
    out["plain_full_cache"] = {"prefill_seconds": sorted(times[1:])[len(times[1:]) // 2], "all": times}
    gate = out["attention_gate"]["prefill_seconds"] / out["streaming_llm"]["prefill_seconds"] - 1
    write_result(args.name or f"overhead_{args.model}", {
        "what": "prefill time at equal chunk size: Attention-Gate scoring vs no scoring (StreamingLLM, same eviction), "
                "and the plain full-cache chunked prefill; median of repeats after a warm-up",
        "model": args.model, "context": args.context, "chunk": args.chunk, "budget": args.budget,
        "results": out, "gate_overhead_fraction": round(gate, 4),
    })
    print(out, "gate overhead", gate)


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
    a.add_argument("--name", default=None)
    a.set_defaults(func=cmd_prefill)
    d = sub.add_parser("decode")
    d.add_argument("--context", type=int, default=32768)
    d.add_argument("--budget", type=int, default=2048)
    d.add_argument("--window", type=int, default=64)
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--method", default="attention_gate")
    d.add_argument("--full-batches", type=int, nargs="+", default=[1, 2, 4, 8, 12, 14, 16])
    d.add_argument("--trainkv-batches", type=int, nargs="+", default=[8, 16, 32, 64, 96, 128, 160, 192])
    d.add_argument("--name", default=None)
    d.set_defaults(func=cmd_decode)
    o = sub.add_parser("overhead")
    o.add_argument("--model", default="llama3.1-8b")
    o.add_argument("--context", type=int, default=32768)
    o.add_argument("--chunk", type=int, default=4096)
    o.add_argument("--budget", type=int, default=4096)
    o.add_argument("--window", type=int, default=64)
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--name", default=None)
    o.set_defaults(func=cmd_overhead)
    args = p.parse_args()
    torch.manual_seed(0)
    args.func(args)


if __name__ == "__main__":
    main()
