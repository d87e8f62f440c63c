"""Decode latency (issue 19): tokens/s of `generate` decoding after a real chunked prefill, against its roofline.

    python benchmarks/decode_latency.py --model llama3.1-8b-random --out $OUT/decode_latency_8b.json
    python benchmarks/decode_latency.py --model smollm2-135m --out $OUT/decode_latency_smollm2.json
    python benchmarks/decode_latency.py --smoke --out /tmp/decode_latency_smoke.json      # CPU, tiny, seconds
    python benchmarks/decode_latency.py --plan                                            # estimated times only

Rows, for each context (default 8K, 32K, 128K) and batch (default 1 and 8):

    hf_dynamic           transformers + DynamicCache (the full cache), eager
    hf_static_compiled   transformers + StaticCache + torch.compile (generate's own auto-compile of a compileable
                         cache, mode "reduce-overhead", CompileConfig(dynamic=True): one compilation for every
                         context and batch size), the full cache
    trainkv_eager        trainkv, today's compacting decode step          } each at every budget
    trainkv_static       trainkv, the static slot-replacement step, eager  } (default 1024, 2048, 4096)
    trainkv_graphed      trainkv, the static step captured as CUDA graphs  }

How: one chunked prefill of ``context - 1`` tokens at batch 1 per (context, cache kind) -- the full cache once, the
trainkv cache once per budget -- then, per row, a copy of that cache repeated to the batch size goes into
``generate`` with the whole prompt (generate prefills the last token itself) and ``warm + steps`` new tokens
(``min_new_tokens`` too). A stopping criterion records a synchronized timestamp per token; the first ``warm`` tokens
(first token, the step that moves the cache into its slots, graph warm-up and capture, compile, cudagraph
recording) are excluded. ``linear_floor`` (per batch size): the model's linear layers alone in one CUDA graph,
the weight reads of a step with the kernels torch picks, i.e. the floor under every row. A graphed row also times
the same graph without generate (``forward_only_*``: one-token forwards in a loop, one synchronize at the end),
which splits its step into the graph and generate's per-token host work. Batch-8 rows decode from the batch-1 prefill repeated 8 times: decoding speed does not
depend on what the rows hold, and eight prefills at 128K would take minutes.

Roofline of a row: ``batch / ((weight bytes read + KV bytes read per step) / bandwidth)``, the bandwidth measured in
the same run by a large device-to-device copy (read + write bytes / time). Weight bytes: every parameter except an
untied input embedding (one row of it is read per token). KV bytes: the entries attention reads per step: the
context (DynamicCache), the whole preallocated length (StaticCache), the budget + 1 (compacting step), the slots of
the static buffer (static step). Rows whose estimated memory does not fit the free memory are recorded as skipped
with the estimate; a run out of time (``--time-budget``) records the rest as skipped. The JSON is rewritten after
every row, so a killed run keeps what it finished.

The 8B figures use the exact Llama-3.1-8B config with random bf16 weights and untrained (random) gates: speed does
not depend on weight values. SmolLM2-135M uses its real weights and the shipped Attention-Gate checkpoint (trained
with chunk 512; prefill here uses ``--chunk``, which does not change decoding speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from common import LLAMA31_8B, environment, llama31_8b_random
from generation import cleanup
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache, StoppingCriteria
from transformers.generation.configuration_utils import CompileConfig

import trainkv
from trainkv.decode_graphs import DecodeGraphs
from trainkv.static_decode import SLOT_ALIGN, compile_status

ROWS = ("hf_dynamic", "hf_static_compiled", "trainkv_eager", "trainkv_static", "trainkv_graphed")
TRAINKV_ROWS = ROWS[2:]
MODELS = ("llama3.1-8b-random", "smollm2-135m")
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m" / "attention_gate"
GIB = 2**30

# Assumptions behind `estimate` (the plan printed with the commands). Measured on this H200 in earlier runs:
# benchmarks/results/decode_8b.json (full cache, eager, batch 1 at 32K: 50.6 tok/s -> ~0.6 ms per layer of host-bound
# step; trainkv today's step 12.8-18.3 tok/s -> ~2 ms per layer), prefill_8b_long.json (trainkv prefill ~19.5K tok/s),
# the issue (full-cache 8B prefill: ~20 s at 128K); assumed: the static step's host cost half of today's, a captured
# step at 70% of its roofline, 90 s / 40 s for transformers' first compile (8B / SmolLM2), 20 s for the slot choice.
ASSUME = {
    "bandwidth": 4.0e12,
    "host_ms_per_layer": {"hf_dynamic": 0.62, "trainkv_eager": 2.0, "trainkv_static": 1.0},
    "captured_fraction_of_roofline": 0.7,
    "first_compile_s": {"llama3.1-8b-random": 90.0, "smollm2-135m": 40.0},
    "slot_compile_s": 20.0,
    "prefill_tokens_per_s": {"llama3.1-8b-random": 19500.0, "smollm2-135m": 60000.0},
    "full_prefill_s_at_128k": {"llama3.1-8b-random": 20.0, "smollm2-135m": 4.0},
}


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
SMOKE_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)


def build_model(args):
    """(model, source description)."""
    if args.smoke:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOKE_CONFIG, max_position_embeddings=4096)).eval()
        return model, "tiny random Llama (smoke check, CPU, fp32)"
    if args.model == "llama3.1-8b-random":
        if args.cpu:
            raise SystemExit("--cpu runs smollm2-135m only")
        model = llama31_8b_random(max_positions=max(131072, max(args.contexts) + args.warm + args.steps + 64))
        return model, "meta-llama/Llama-3.1-8B-Instruct config, random bf16 weights"
    if args.cpu:
        model = trainkv.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
        return model, "SmolLM2-135M-Instruct real weights (GGUF dequantized), fp32, CPU"
    model = trainkv.load_model("smollm2-135m", dtype=torch.bfloat16, device="cuda")
    return model, "SmolLM2-135M-Instruct real weights (GGUF dequantized), bf16"


def attach(model, args, budget: int):
    """Attach the trainkv method at ``budget`` (SmolLM2: the shipped gates unless --method says otherwise)."""
    if args.model == "smollm2-135m" and not args.smoke and args.method == "shipped":  # its own sinks and window
        trainkv.load_gated(CHECKPOINT, model=model, budget=budget, chunk_size=args.chunk)
    else:
        method = "attention_gate" if args.method == "shipped" else args.method
        trainkv.attach(model, method, trainkv.EvictionConfig(budget=budget, chunk_size=args.chunk,
                                                             sink_tokens=args.sinks, recent_window=args.window))
    if args.smoke or args.cpu:  # no CUDA: the graph runner runs emulated (its logic, not a real capture)
        model.trainkv_state.graphs = DecodeGraphs(emulate=True)


def detach(model) -> None:
    if hasattr(model, "trainkv_state"):
        trainkv.detach(model)


def shape(model) -> dict:
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    elt = next(model.parameters()).element_size()
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads, "head_dim": head_dim,
            "element_size": elt, "kv_bytes_per_entry": 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * elt,
            "weight_bytes": params, "weight_bytes_read_per_step": params - (0 if tied else embed.numel() * embed.element_size()),
            "vocab": text.vocab_size}


def slots_for(budget: int) -> int:
    return -(-(budget + 1) // SLOT_ALIGN) * SLOT_ALIGN


# ---------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_bytes(device) -> int | None:
    if device.type != "cuda":
        return None
    cleanup()
    return torch.cuda.mem_get_info()[0]


def measure_bandwidth(device) -> dict:
    """Device-to-device copy bandwidth: (read + written bytes) / time, best of several repeats."""
    n = (2 * GIB) if device.type == "cuda" else 64 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = math.inf
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    cleanup()
    return {"bytes_per_s": 2 * n / best, "copy_bytes": n, "method": "best of 10 copies of a buffer, 2 x bytes / s"}


@torch.no_grad()
def linear_floor(model, batch: int = 1, repeats: int = 20) -> dict:
    """The model's linear layers alone, one token per row: every `nn.Linear` applied once to a preallocated input,
    captured as one CUDA graph on CUDA (eager elsewhere) and replayed. Its time is the floor a decoding step cannot
    beat with these kernels (the weight reads of a step, nothing else), beside the copy bandwidth's roofline."""
    device = next(model.parameters()).device
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch, m.in_features, device=device, dtype=m.weight.dtype) for m in linears]

    def step():
        for m, x in zip(linears, inputs):
            torch.nn.functional.linear(x, m.weight, m.bias)

    run = step
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up (cuBLAS handles and workspaces) before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    run()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    return {"ms": round(1e3 * seconds, 3), "weight_bytes": weight_bytes, "bytes_per_s": weight_bytes / seconds,
            "linears": len(linears), "batch": batch, "graphed": device.type == "cuda",
            "what": "every nn.Linear once on one token per row (the weight reads of a decoding step alone)"}


class StepTimer(StoppingCriteria):
    """Records a synchronized timestamp each time generate produced a token (never stops generation)."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def prefill(model, cache, ids, chunk: int) -> float:
    """Chunked prefill of ``ids`` into ``cache`` the way generate does it; returns seconds."""
    device = ids.device
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
    sync(device)
    start = time.perf_counter()
    for s in range(0, ids.shape[1], chunk):
        e = min(ids.shape[1], s + chunk)
        model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], cache=cache, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - start


def decode(model, ids, cache, args, **generate_kwargs) -> dict:
    """``warm + steps`` greedy tokens through generate on a prefilled ``cache``; tokens/s over the last ``steps``."""
    device = ids.device
    timer = StepTimer(device)
    new = args.warm + args.steps + 1  # timestamps after each token: steps intervals after the warm ones
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, stopping_criteria=[timer],
                             prefill_chunk_size=args.chunk, return_dict_in_generate=True, **generate_kwargs)
    sync(device)
    total = time.perf_counter() - start
    t = timer.times
    timed = len(t) - 1 - args.warm
    seconds = t[-1] - t[args.warm]
    steps_ms = sorted(1e3 * (b - a) for a, b in zip(t[args.warm:], t[args.warm + 1:]))
    res = {
        "new_tokens": new, "timed_tokens": timed, "decode_seconds": round(seconds, 4),
        "decode_tokens_per_s": round(ids.shape[0] * timed / seconds, 2),
        "step_ms_median": round(steps_ms[len(steps_ms) // 2], 3), "step_ms_min": round(steps_ms[0], 3),
        "warmup_seconds": round(t[args.warm] - start, 3), "generate_seconds": round(total, 3),
    }
    if device.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    return res, out


@torch.no_grad()
def forward_steps(model, cache, batch: int, start: int, args) -> dict:
    """Graphed decoding forwards alone, on a prefilled ``cache``: no generate and no per-token synchronize, so this
    is the step's own time (the graph, or the host when the host is slower). ``args.warm`` untimed steps (entering
    the slots, warm-up, capture), then ``args.steps`` timed between two synchronizes; greedy tokens fed back."""
    device = next(model.parameters()).device
    model.configure_decode(cache, dict(static=True, cuda_graphs=True))
    n = args.warm + args.steps
    positions = torch.arange(start, start + n, device=device)[:, None, None].expand(n, batch, 1)
    token = torch.full((batch, 1), min(1000, model.config.vocab_size - 1), dtype=torch.long, device=device)
    begin = None
    for i in range(n):
        if i == args.warm:
            sync(device)
            begin = time.perf_counter()
        out = model(input_ids=token, position_ids=positions[i], cache=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    seconds = time.perf_counter() - begin
    cache.end_static()
    return {"forward_only_tokens_per_s": round(batch * args.steps / seconds, 2),
            "forward_only_step_ms": round(1e3 * seconds / args.steps, 3)}


def roofline(info: dict, batch: int, entries: int, bandwidth: float, measured: float | None) -> dict:
    kv = batch * entries * info["kv_bytes_per_entry"]
    step_bytes = info["weight_bytes_read_per_step"] + kv
    tokens = batch * bandwidth / step_bytes
    out = {"weight_bytes": info["weight_bytes_read_per_step"], "kv_bytes": kv, "kv_entries_read_per_row": entries,
           "step_bytes": step_bytes, "tokens_per_s": round(tokens, 1), "step_ms": round(1e3 * step_bytes / bandwidth, 3)}
    if measured:
        out["fraction"] = round(measured / tokens, 3)
    return out


# ---------------------------------------------------------------------------------------------------------
# caches for one batch size, from a batch-1 prefill
# ---------------------------------------------------------------------------------------------------------
def repeat_cache(source, batch: int):
    """A copy of a batch-1 cache (DynamicCache or EvictingCache) repeated to ``batch`` rows."""
    cache = copy.deepcopy(source)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache


def static_for_batch(model, info: dict, source: DynamicCache, batch: int, max_len: int) -> StaticCache:
    p = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    cache.early_initialization(batch_size=batch, num_heads=info["kv_heads"], head_dim=info["head_dim"], dtype=p.dtype,
                               device=p.device)
    for dst, src in zip(cache.layers, source.layers):
        n = src.keys.shape[-2]
        dst.keys[:, :, :n].copy_(src.keys.expand(batch, -1, -1, -1))
        dst.values[:, :, :n].copy_(src.values.expand(batch, -1, -1, -1))
        dst.cumulative_length.fill_(n)
    return cache


# ---------------------------------------------------------------------------------------------------------
# memory and time estimates
# ---------------------------------------------------------------------------------------------------------
def need_bytes(info: dict, row: str, context: int, batch: int, budget: int | None, args) -> int:
    """Estimated memory a row needs beyond the weights (and the batch-1 source cache it copies)."""
    per = info["kv_bytes_per_entry"]
    margin = (2 * GIB if info["weight_bytes"] > GIB else GIB // 4) + batch * info["vocab"] * 4 * 4
    new = args.warm + args.steps + 9
    if row == "hf_dynamic":
        return batch * (context + new) * per + margin
    if row == "hf_static_compiled":
        return batch * (context + new) * per + 2 * margin
    return 2 * batch * slots_for(budget) * per + margin


def estimate(info: dict, model_name: str, row: str, context: int, batch: int, budget: int | None, args,
             bandwidth: float) -> float:
    """Seconds a row takes: its share of prefill, warm-up, and ``warm + steps`` tokens at the assumed step time."""
    entries = {"hf_dynamic": context, "hf_static_compiled": context + args.warm + args.steps,
               "trainkv_eager": (budget or 0) + 1}.get(row, slots_for(budget or 0))
    step = (info["weight_bytes_read_per_step"] + batch * entries * info["kv_bytes_per_entry"]) / bandwidth
    host = ASSUME["host_ms_per_layer"].get(row)
    if host is not None:
        step = max(step, host * 1e-3 * info["layers"])
    else:
        step = step / ASSUME["captured_fraction_of_roofline"]
    return (args.warm + args.steps + 1) * step


def prefill_estimate(model_name: str, kind: str, context: int) -> float:
    if kind == "full":  # quadratic attention: t = t128k * (a x + (1 - a) x^2), x = context / 128K, a = 0.25
        x = context / 131072
        return ASSUME["full_prefill_s_at_128k"][model_name] * (0.25 * x + 0.75 * x * x)
    return context / ASSUME["prefill_tokens_per_s"][model_name]


def plan(args, info: dict, bandwidth: float, memory: float = 139.8 * GIB) -> list[dict]:
    """The rows the run will make, with their estimated seconds (prefill counted once where it is shared; rows that
    would not fit ``memory`` are marked skipped and cost nothing)."""
    name = args.model
    out = []
    for context in args.contexts:
        steps = args.steps
        full_prefill = prefill_estimate(name, "full", context)
        first = True
        for row in ("hf_dynamic", "hf_static_compiled"):
            if row not in args.rows:
                continue
            for batch in args.batches:
                need = info["weight_bytes"] + context * info["kv_bytes_per_entry"] + need_bytes(
                    info, row, context, batch, None, args)
                if need > 0.92 * memory:
                    out.append({"row": row, "context": context, "batch": batch, "budget": None, "seconds": 0.0,
                                "steps": steps, "skipped": f"~{need / GIB:.0f} GiB"})
                    continue
                s = estimate(info, name, row, context, batch, None, args, bandwidth)
                if first:
                    s += full_prefill
                    first = False
                if row == "hf_static_compiled" and not any(r["row"] == row and r["batch"] == batch and
                                                           not r.get("skipped") for r in out):
                    compiled = any(r["row"] == row and not r.get("skipped") for r in out)
                    s += ASSUME["first_compile_s"][name] * (0.7 if compiled else 1.0)  # batch 1 is specialised
                out.append({"row": row, "context": context, "batch": batch, "budget": None, "seconds": s,
                            "steps": steps})
        for budget in args.budgets:
            first = True
            for batch in args.batches:
                for row in TRAINKV_ROWS:
                    if row not in args.rows:
                        continue
                    s = estimate(info, name, row, context, batch, budget, args, bandwidth)
                    if first:
                        s += prefill_estimate(name, "trainkv", context)
                        first = False
                    if row == "trainkv_graphed" and not any(r["row"] == row and r["batch"] == batch for r in out):
                        s += ASSUME["slot_compile_s"]  # once per batch size (size-1 dimensions are specialised)
                    out.append({"row": row, "context": context, "batch": batch, "budget": budget, "seconds": s,
                                "steps": steps})
    return out


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args, model, source: str):
        self.args = args
        self.model = model
        self.device = next(model.parameters()).device
        self.info = shape(model)
        self.rows: list[dict] = []
        self.start = time.perf_counter()
        self.bandwidth = measure_bandwidth(self.device)
        # batch 1 always: a batch-1 row's roofline is judged against it even in a batched-only run
        self.floor = {b: linear_floor(model, b) for b in sorted({1, *args.batches})}
        self.payload = {
            "what": "decode tokens/s through generate after a real chunked prefill, and the roofline of each row "
                    "(module doc of benchmarks/decode_latency.py)",
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "model": args.model if not args.smoke else "smoke", "model_source": source,
            "settings": {"contexts": args.contexts, "budgets": args.budgets, "batches": args.batches,
                         "steps": args.steps, "warm": args.warm, "chunk": args.chunk, "method": args.method,
                         "sink_tokens": args.sinks, "recent_window": args.window, "rows": list(args.rows)},
            "shape": self.info, "bandwidth": self.bandwidth,
            "linear_floor": {str(b): f for b, f in self.floor.items()},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, complete: bool = False) -> None:
        payload = {"environment": environment(), **self.payload, "complete": complete,
                   "elapsed_seconds": round(self.elapsed(), 1), "rows": self.rows,
                   "slot_choice_compile": compile_status()}
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)

    def add_failure(self, base: dict, exc: Exception) -> None:
        """A row that did not run: out of memory is a skip (it does not fit), anything else an error."""
        if isinstance(exc, torch.OutOfMemoryError):
            self.add({**base, "skipped": f"out of memory: {exc}"[:200]})
        else:
            self.add({**base, "error": f"{type(exc).__name__}: {exc}"[:500]})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()
        short = {k: row.get(k) for k in ("row", "context", "batch", "budget", "decode_tokens_per_s", "skipped", "error")}
        if "roofline" in row:
            short["roofline_fraction"] = row["roofline"].get("fraction")
        print(json.dumps(short), flush=True)
        if self.args.stop_after and len(self.rows) >= self.args.stop_after:
            raise SystemExit(f"stopped after {len(self.rows)} rows (--stop-after)")

    def skip_reason(self, row: str, context: int, batch: int, budget: int | None) -> str | None:
        need = need_bytes(self.info, row, context, batch, budget, self.args)
        free = free_bytes(self.device)
        if free is not None and need > 0.92 * free:
            return f"needs ~{need / GIB:.1f} GiB beyond what is allocated, {free / GIB:.1f} GiB free"
        if self.args.time_budget:
            left = self.args.time_budget - self.elapsed()
            est = estimate(self.info, self.args.model, row, context, batch, budget, self.args,
                           self.bandwidth["bytes_per_s"])
            if est > left:
                return f"time budget: ~{est:.0f} s estimated, {max(0.0, left):.0f} s left"
        return None

    def prefill_skip(self, kind: str, context: int) -> str | None:
        """A reason to skip a whole group (its prefill would not finish within the time budget), or None."""
        if not self.args.time_budget or self.args.smoke or self.args.cpu:
            return None
        left = self.args.time_budget - self.elapsed()
        est = prefill_estimate(self.args.model, kind, context)
        return f"time budget: prefill ~{est:.0f} s estimated, {max(0.0, left):.0f} s left" if est > left else None

    def base_row(self, row: str, context: int, batch: int, budget: int | None) -> dict:
        return {"row": row, "context": context, "batch": batch, "budget": budget}

    def measured(self, base: dict, entries: int, res: dict) -> dict:
        base.update(res)
        base["roofline"] = roofline(self.info, base["batch"], entries, self.bandwidth["bytes_per_s"],
                                    res.get("decode_tokens_per_s"))
        return base

    def prompt(self, context: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(context)
        vocab = self.info["vocab"]
        return torch.randint(min(100, vocab // 4), min(20000, vocab), (1, context), generator=gen).to(self.device)

    # --- the full cache ------------------------------------------------------------------------------
    def full_cache_rows(self, context: int) -> None:
        args, model = self.args, self.model
        wanted = [r for r in ("hf_dynamic", "hf_static_compiled") if r in args.rows]
        if not wanted:
            return
        reason = self.skip_reason("hf_dynamic", context, 1, None) or self.prefill_skip("full", context)
        if reason is not None:
            for row in wanted:
                for batch in args.batches:
                    self.add({**self.base_row(row, context, batch, None), "skipped": reason})
            return
        detach(model)
        ids = self.prompt(context)
        source = DynamicCache(config=model.config)
        try:
            seconds = prefill(model, source, ids[:, :-1], args.chunk)
        except torch.OutOfMemoryError as exc:
            for row in wanted:
                for batch in args.batches:
                    self.add({**self.base_row(row, context, batch, None), "skipped": f"prefill out of memory: {exc}"[:200]})
            return
        prefill_info = {"prefill_seconds_batch1": round(seconds, 3), "prefill_tokens_per_s": round((context - 1) / seconds, 1)}
        for row in wanted:
            for batch in args.batches:
                base = self.base_row(row, context, batch, None)
                reason = self.skip_reason(row, context, batch, None)
                if reason is not None:
                    self.add({**base, "skipped": reason})
                    continue
                try:
                    ids_b = ids.expand(batch, -1)
                    if row == "hf_dynamic":
                        res, _ = decode(model, ids_b, repeat_cache(source, batch), args)
                        entries = context + args.warm + args.steps // 2
                    else:
                        max_len = context + args.warm + args.steps + 9
                        cache = static_for_batch(model, self.info, source, batch, max_len)
                        on_gpu = self.device.type == "cuda"
                        kw = {"compile_config": CompileConfig(dynamic=True)} if on_gpu else {"disable_compile": True}
                        res, _ = decode(model, ids_b, cache, args, **kw)
                        entries = max_len
                        res["compiled"] = on_gpu
                        del cache
                    self.add({**self.measured(base, entries, res), **prefill_info})
                except Exception as exc:  # noqa: BLE001 - record and go on
                    self.add_failure(base, exc)
                cleanup()
        del source
        cleanup()

    # --- trainkv --------------------------------------------------------------------------------------
    def trainkv_rows(self, context: int, budget: int) -> None:
        args, model = self.args, self.model
        wanted = [r for r in TRAINKV_ROWS if r in args.rows]
        if not wanted:
            return
        reason = self.prefill_skip("trainkv", context)
        if reason is not None:
            for batch in args.batches:
                for row in wanted:
                    self.add({**self.base_row(row, context, batch, budget), "skipped": reason})
            return
        detach(model)
        attach(model, args, budget)
        ids = self.prompt(context)
        source = model.new_cache()
        seconds = prefill(model, source, ids[:, :-1], args.chunk)
        prefill_info = {"prefill_seconds_batch1": round(seconds, 3), "prefill_tokens_per_s": round((context - 1) / seconds, 1)}
        options = {"trainkv_eager": dict(static_decode=False, cuda_graphs=False),
                   "trainkv_static": dict(static_decode=True, cuda_graphs=False),
                   "trainkv_graphed": dict(static_decode=True, cuda_graphs=True)}
        for batch in args.batches:
            for row in wanted:
                base = self.base_row(row, context, batch, budget)
                reason = self.skip_reason(row, context, batch, budget)
                if reason is not None:
                    self.add({**base, "skipped": reason})
                    continue
                graphs = model.trainkv_state.graphs
                before = dict(graphs.stats) if graphs is not None else None
                try:
                    res, out = decode(model, ids.expand(batch, -1), repeat_cache(source, batch), args,
                                      **options[row])
                    stats = out.cache.stats()
                    kept = [n for layer in stats["kept_per_layer_head"] for r in layer for n in r]
                    res.update(kept_min=min(kept), kept_max=max(kept), tokens_seen=stats["tokens_seen"],
                               kv_gib_held=round(stats["bytes"]["kv"] / GIB, 4))
                    entries = budget + 1 if row == "trainkv_eager" else slots_for(budget)
                    res["static_slots"] = None if row == "trainkv_eager" else slots_for(budget)
                    graphs = model.trainkv_state.graphs
                    if row == "trainkv_graphed":
                        res["graphs"] = {k: v - (before or {}).get(k, 0) for k, v in graphs.stats.items()} \
                            if graphs is not None else None
                        res["graph_failures"] = list(graphs.failed.values())[:2] if graphs is not None else None
                        res["graphs_emulated"] = bool(graphs is not None and graphs.emulate)
                        try:  # the same graph replayed without generate (its per-token host work and sync)
                            res.update(forward_steps(model, repeat_cache(source, batch), batch, context - 1, args))
                        except Exception as exc:  # noqa: BLE001 - record and go on
                            res["forward_only_error"] = f"{type(exc).__name__}: {exc}"[:300]
                        if graphs is not None:
                            graphs.clear()  # each graph holds its cache buffers
                    self.add({**self.measured(base, entries, res), **prefill_info})
                    del out
                except Exception as exc:  # noqa: BLE001 - record and go on
                    self.add_failure(base, exc)
                cleanup()
        del source
        detach(model)
        cleanup()

    def run(self) -> None:
        self.write()
        for context in self.args.contexts:
            self.full_cache_rows(context)
            for budget in self.args.budgets:
                self.trainkv_rows(context, budget)
        self.write(complete=True)


# ---------------------------------------------------------------------------------------------------------
# commands for the H200
# ---------------------------------------------------------------------------------------------------------
# Longest contexts first: if the time budget runs out, the 8K rows are the ones skipped.
GPU_COMMANDS = [
    ("llama3.1-8b-random", "python3 benchmarks/decode_latency.py --model llama3.1-8b-random --contexts 131072 32768 "
     "8192 --budgets 2048 1024 4096 --batches 1 8 --steps 32 --time-budget 380 --out $OUT/decode_latency_8b.json"),
    ("smollm2-135m", "python3 benchmarks/decode_latency.py --model smollm2-135m --contexts 131072 32768 8192 "
     "--budgets 2048 1024 4096 --batches 1 8 --steps 32 --time-budget 220 --out $OUT/decode_latency_smollm2.json"),
]

SHAPES = {  # for --plan without loading anything: (layers, kv heads, head dim, bytes/elt, weight bytes read, total)
    "llama3.1-8b-random": (32, 8, 128, 2, (8030261248 - 128256 * 4096) * 2, 8030261248 * 2),
    "smollm2-135m": (30, 3, 64, 2, 134515008 * 2, 134515008 * 2),
}


def plan_info(name: str) -> dict:
    layers, heads, dim, elt, read, total = SHAPES[name]
    vocab = LLAMA31_8B["vocab_size"] if name.startswith("llama") else 49152
    return {"layers": layers, "kv_heads": heads, "head_dim": dim, "element_size": elt,
            "kv_bytes_per_entry": 2 * layers * heads * dim * elt, "weight_bytes": total,
            "weight_bytes_read_per_step": read, "vocab": vocab}


def print_plan(args) -> None:
    print("Estimated time per row (H200): step = max(roofline, host-bound floor) for eager rows, roofline / 0.7 "
          "for captured/compiled rows, bandwidth 4.0 TB/s assumed (measured in the run); prefill shared per "
          "(context, cache kind) and counted on its first row; first compiles added once (ASSUME in the script).")
    for name, command in GPU_COMMANDS:
        a = argparse.Namespace(**{**vars(args), "model": name, "steps": 32, "contexts": [131072, 32768, 8192],
                                  "budgets": [2048, 1024, 4096], "batches": [1, 8], "rows": ROWS})
        info = plan_info(name)
        rows = plan(a, info, ASSUME["bandwidth"])
        total = sum(r["seconds"] for r in rows) + (15 if name.startswith("llama") else 5)
        print(f"\n{name}: {len(rows)} rows, ~{total:.0f} s estimated (model build included)")
        for r in rows:
            note = f"  skipped: needs {r['skipped']}" if r.get("skipped") else ""
            print(f"  {r['row']:<20} ctx {r['context']:>6} batch {r['batch']} budget {r['budget'] or '-':>4}  "
                  f"~{r['seconds']:.1f} s{note}")
    print_commands()


def print_commands() -> None:
    print("\nOn the H200 (transformers 5.24 as in scripts/gpu/runtime_8b_smollm2.sh: `source .gpu/b/setup.sh`), "
          "two commands, ~9 min estimated in all (--plan), each bounded by its --time-budget (+ model build):")
    for _, command in GPU_COMMANDS:
        print(f"  PYTHONUNBUFFERED=1 {command}")
    print("The rows these two left unmeasured (batched 8B at 32K, SmolLM2 batch 1 with same-run baselines) are one "
          "call of scripts/gpu/decode_latency.sh (docs/notes/issue19_decode.md).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="llama3.1-8b-random")
    p.add_argument("--contexts", type=int, nargs="+", help="default 8192 32768 131072 (smoke: 96 160)")
    p.add_argument("--budgets", type=int, nargs="+", help="default 1024 2048 4096 (smoke: 32 48)")
    p.add_argument("--batches", type=int, nargs="+", help="default 1 8 (smoke: 1 2)")
    p.add_argument("--steps", type=int, help="timed decoding tokens per row (default 32; smoke: 6)")
    p.add_argument("--warm", type=int, default=6, help="untimed first tokens per row (transition, capture, compile)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--method", default="shipped",
                   help="trainkv method; 'shipped': SmolLM2's trained gates, else attention_gate (untrained on 8B)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; rows that would not finish are skipped")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: a run killed mid-way
    p.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results, decode_latency_<model>.json)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU: checks the script in seconds")
    p.add_argument("--cpu", action="store_true", help="smollm2-135m on the CPU in fp32 (no compile; graphs emulated)")
    p.add_argument("--plan", action="store_true", help="print the estimated time of every row and the GPU commands")
    args = p.parse_args(argv)
    defaults = dict(contexts=([96, 160], [8192, 32768, 131072]), budgets=([32, 48], [1024, 2048, 4096]),
                    batches=([1, 2], [1, 8]), steps=(6, 32))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.smoke:
        args.chunk = min(args.chunk, 64)
        args.sinks, args.window = min(args.sinks, 2), min(args.window, 8)
    if args.out is None:
        root = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        args.out = str(root / f"decode_latency_{'smoke' if args.smoke else args.model}.json")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plan:
        print_plan(args)
        return
    if not (args.smoke or args.cpu) and not torch.cuda.is_available():
        raise SystemExit("decode_latency needs CUDA (or --smoke / --cpu)")
    torch.manual_seed(0)
    model, source = build_model(args)
    run = Run(args, model, source)
    try:
        run.run()
    finally:
        print(f"wrote {args.out} ({len(run.rows)} rows, {run.elapsed():.0f} s)")
        print_commands()


if __name__ == "__main__":
    main()
