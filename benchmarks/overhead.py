"""`runtime_scale.py overhead`: gated vs ungated prefill at equal chunk size (issue 8).

One model, one prompt, one chunk size and budget; the variants differ only in the scoring:

- ``ungated``: the eviction runtime with StreamingLLM scores (the position: one tiny kernel) -- the same
  attention, cache, top-k and gather as the gated run, without a gate;
- ``gated``: Attention-Gate scores (eager);
- ``gated_compiled``: Attention-Gate scores through `torch.compile` (`trainkv.methods.gate_runtime`);
- ``plain_full_cache``: no trainkv at all, transformers' chunked prefill into a full cache.

``gate_overhead`` = gated / ungated - 1 (the issue's figure; goal <= 5%). Each variant: a warm-up
run (compilation included), then ``repeats`` timed runs, median reported; ``ungated`` is measured
again at the end to show drift. With ``--profile``, one more run per gated variant under
`torch.profiler` gives the gate's share of device time and kernels per call.
"""

from __future__ import annotations

import statistics

import torch
from common import bench_model, write_result
from generation import cleanup, random_prompt, run_generate
from profile_share import device_time_shares

import trainkv
from trainkv.methods import gate_runtime


def _timed(model, ids, chunk: int, repeats: int, make_cache) -> dict:
    times = []
    for _ in range(repeats + 1):
        times.append(run_generate(model, ids, 1, chunk, make_cache())["seconds"])
        cleanup()
    return {"prefill_seconds": round(statistics.median(times[1:]), 4), "warmup_seconds": round(times[0], 3),
            "all": [round(t, 4) for t in times[1:]]}


def load_overhead_model(name: str, context: int, smoke: bool = False):
    if name == "llama3.1-8b":
        return bench_model(smoke, max_positions=context + 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return trainkv.load_model(name, dtype=torch.bfloat16, device=device)


def cmd_overhead(args):
    model = load_overhead_model(args.model, args.context, args.smoke)
    ids = random_prompt(model, args.context)
    eviction = trainkv.EvictionConfig(budget=args.budget, chunk_size=args.chunk, sink_tokens=4, recent_window=args.window)
    variants = [("ungated", "streaming_llm", False), ("gated", "attention_gate", False)]
    if not args.no_compile:
        variants.append(("gated_compiled", "attention_gate", True))
    variants.append(("ungated_again", "streaming_llm", False))
    results, profiles = {}, {}
    for label, method, compiled in variants:
        gate_runtime.configure(compile=compiled)
        trainkv.attach(model, method, eviction)
        try:
            results[label] = _timed(model, ids, args.chunk, args.repeats, lambda: model.new_cache())
            if compiled:
                results[label]["compile"] = gate_runtime.compile_status()
            if args.profile and method == "attention_gate":
                short = ids[:, :args.profile_context]
                try:
                    profiles[label] = device_time_shares(lambda: run_generate(model, short, 1, args.chunk, model.new_cache()))
                except Exception as exc:  # noqa: BLE001 - the timing above must survive a profiler problem
                    profiles[label] = {"error": f"{type(exc).__name__}: {exc}"}
                cleanup()
        finally:
            trainkv.detach(model)
            gate_runtime.configure(compile=None)
        print(label, results[label], flush=True)
        write(args, model, results, profiles, partial=True)  # something survives a timeout
    if not args.no_plain:
        results["plain_full_cache"] = _timed(model, ids, args.chunk, args.repeats, lambda: None)
        print("plain_full_cache", results["plain_full_cache"], flush=True)
    print("gate overhead", write(args, model, results, profiles, partial=False))


def write(args, model, results: dict, profiles: dict, partial: bool) -> dict:
    ungated = [results[k]["prefill_seconds"] for k in ("ungated", "ungated_again") if k in results]
    base = statistics.median(ungated) if ungated else None
    overhead = {label: round(results[label]["prefill_seconds"] / base - 1, 4)
                for label in ("gated", "gated_compiled") if label in results and base}
    write_result(args.name or f"overhead_{args.model}", {
        "what": "prefill time at equal chunk size: Attention-Gate scoring (eager, and compiled) vs the same eviction "
                "runtime without a gate (StreamingLLM position scores), plus the plain full-cache chunked prefill; "
                "median of repeats after a warm-up" + (" (8B: exact Llama-3.1-8B config, random bf16 weights, "
                                                       "untrained random gates)" if args.model == "llama3.1-8b" else ""),
        "partial": partial,
        "model": args.model, "model_source": getattr(model.config, "trainkv_base_model", args.model),
        "context": args.context, "chunk": args.chunk, "budget": args.budget, "recent_window": args.window,
        "results": results, "ungated_prefill_seconds": base, "gate_overhead_fraction": overhead,
        "goal": "gate_overhead_fraction <= 0.05",
        "profile": {"context": args.profile_context, **profiles} if profiles else None,
    })
    return overhead


def add_parser(sub) -> None:
    o = sub.add_parser("overhead", help="gated vs ungated prefill at equal chunk size (eager and compiled gate)")
    o.add_argument("--model", default="llama3.1-8b")
    o.add_argument("--context", type=int, default=32768)
    o.add_argument("--chunk", type=int, default=4096)
    o.add_argument("--budget", type=int, default=4096)
    o.add_argument("--window", type=int, default=64)
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    o.add_argument("--no-plain", action="store_true", help="skip the plain full-cache run")
    o.add_argument("--profile", action="store_true", help="one profiled run per gated variant (device-time shares)")
    o.add_argument("--profile-context", type=int, default=16384, help="prompt length of the profiled runs")
    o.add_argument("--smoke", action="store_true", help="tiny random model on CPU (with the 8B model name)")
    o.add_argument("--name", default=None)
    o.set_defaults(func=cmd_overhead)
