"""Training throughput (issue 9): tokens/s and model-FLOPs utilisation of Attention-Gate training.

The real trainer (`trainkv.training.train`) runs the Attention-Gate recipe's settings on a model built
from a config with RANDOM weights (by default the exact Llama-3.1-8B config, bf16 on GPU; speed and
memory do not depend on weight values): ``--warmup`` untimed steps, then ``--steps`` timed ones, one
sequence of ``--seq-len`` random tokens per GPU and step, gradient checkpointing on. One JSON per run.

    # 1 GPU, then 2 GPUs with DDP (each GPU holds the frozen 16 GB backbone) or ZeRO-3 (backbone sharded)
    accelerate launch --config_file configs/accelerate/single_gpu.yaml benchmarks/train_throughput.py \
        --output $OUT/throughput_1gpu.json
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 \
        benchmarks/train_throughput.py --output $OUT/throughput_2gpu_ddp.json
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 2 \
        benchmarks/train_throughput.py --output $OUT/throughput_2gpu_zero3.json
    # scaling efficiency of runs with different GPU counts (weak scaling: same batch per GPU)
    python benchmarks/train_throughput.py --combine throughput_1gpu.json throughput_2gpu_ddp.json \
        --output throughput_scaling.json
    # CPU smoke test (seconds): a tiny random Llama
    python benchmarks/train_throughput.py --model-config tiny --seq-len 128 --warmup 1 --steps 2 --output /tmp/tp.json

Extra ``key=value`` arguments override the recipe (``eviction.chunk_size=512``, ``method.gate_heads=4``).
The FLOP model is in `flops_per_sequence` and is written into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # `common` and a source checkout of trainkv

import torch  # noqa: E402

from common import LLAMA31_8B, environment  # noqa: E402

DEFAULT_RECIPE = ROOT / "configs/recipes/llama3.1-8b/attention_gate_sft.yaml"
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
MODEL_CONFIGS = {"llama3.1-8b": ("Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct config)", LLAMA31_8B),
                 "tiny": ("tiny random Llama (CPU smoke test)", TINY)}

# Dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's datasheets; first substring match wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("GH200", 989.4, "GH200 (H100 SXM class)"),
    ("H200", 989.4, "H200 SXM (same tensor cores as H100 SXM)"),
    ("H100", 989.4, "H100 SXM"),
    ("H800", 989.4, "H800 SXM"),
    ("A100", 312.0, "A100"),
]
FLOP_METHODS = ("attention_gate",)  # methods whose passes `flops_per_sequence` describes


# --- FLOPs -----------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    linear_params: int  # N: weights of every matmul of the backbone (q, k, v, o, MLP, LM head); embedding lookup excluded
    matmul_forward: float  # 2 N T
    attention_forward: float  # 2 L Hq D T^2 (causal: half of the 4 L Hq D T^2 of QK^T and PV)
    teacher_forwards: int
    model: float  # per sequence, what the step must compute (no recomputation)
    hardware: float  # model + the gradient-checkpointing recomputation of the student forward
    formula: str


def flops_per_sequence(config, seq_len: int, teacher: bool, gradient_checkpointing: bool) -> FlopCount:
    """FLOPs of one Attention-Gate training sequence of ``seq_len`` tokens (frozen backbone).

    Passes: the teacher forward (self-distillation target, no grad, no gates), the student forward
    (soft gates), the student's backward, which needs only input gradients through the frozen
    backbone (one matmul per linear layer instead of two; attention backward = 2x its forward for
    dQ, dK, dV), and under gradient checkpointing one recomputed student forward. The gate modules
    (< 0.2% of the backbone's FLOPs), norms, softmaxes and the KL are not counted; the gated
    attention's extra key channel and its masked (not skipped) chunk blocks neither.
    """
    h, layers, hq = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    hkv = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    per_layer = h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * config.intermediate_size
    n = layers * per_layer + h * config.vocab_size
    t = seq_len
    mm = 2.0 * n * t
    attn = 2.0 * layers * hq * d * t * t
    forward = mm + attn
    backward = mm + 2 * attn
    teachers = 1 if teacher else 0
    model = teachers * forward + forward + backward
    hardware = model + (forward if gradient_checkpointing else 0.0)
    fwd = "(2*N*T + 2*L*Hq*D*T^2)"
    formula = (f"model = {teachers} teacher fwd + 1 student fwd + 1 student input-grad bwd = "
               f"{teachers + 2}*2*N*T + {teachers + 3}*2*L*Hq*D*T^2; hardware = model"
               + (f" + 1 recomputed student fwd {fwd}" if gradient_checkpointing else "")
               + "; N = matmul weights of the backbone incl. LM head (q,k,v,o,gate,up,down per layer + hidden*vocab), "
               "T = tokens per sequence, L = layers, Hq = query heads, D = head dim; causal attention")
    return FlopCount(n, mm, attn, teachers, model, hardware, formula)


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    for key, value, label in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"{label}: {value} TFLOP/s dense bf16 (NVIDIA datasheet)"
    return None, f"unknown peak for {device_name!r}: pass --peak-tflops"


# --- the run ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="llama3.1-8b",
                    help="llama3.1-8b (default, exact config), tiny (CPU test), or a JSON file of LlamaConfig fields")
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML giving the method and eviction settings")
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence (default 8192)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per GPU and step (default 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (default 8)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every activation (needs more memory)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for the MFU (default: from the GPU name)")
    ap.add_argument("--workdir", default=None, help="trainer output_dir (default runs/train_throughput/<model>-<N>proc)")
    ap.add_argument("--output", required=True, help="JSON file to write (main process)")
    ap.add_argument("--label", default=None, help="free text stored in the JSON (e.g. the launch command)")
    ap.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                    help="instead of running: combine result files into a scaling table (written to --output)")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"unknown arguments {bad} (recipe overrides are key=value)")
    return args, overrides


def model_config_from(arg: str) -> tuple[str, dict]:
    if arg in MODEL_CONFIGS:
        return MODEL_CONFIGS[arg]
    path = Path(arg)
    if not path.is_file():
        raise SystemExit(f"--model-config: {arg!r} is neither one of {sorted(MODEL_CONFIGS)} nor a JSON file")
    return path.stem, json.loads(path.read_text())


def random_rows(num: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num):
        ids = torch.randint(0, vocab, (seq_len,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def build_config(args, overrides: list[str], model_config: dict, world: int):
    from trainkv.training import TrainConfig

    tag = Path(args.model_config).stem
    workdir = args.workdir or str(ROOT / "runs" / "train_throughput" / f"{tag}-{world}proc")
    fixed = [
        f"output_dir={workdir}", "overwrite_output_dir=true", "resume=false", "save_every=0", "report_to=none",
        "progress_bar=false", "log_every=1", f"max_steps={args.warmup + args.steps}", f"batch_size={args.batch_size}",
        "gradient_accumulation_steps=1", "warmup_steps=0", "warmup_ratio=0.0",
        f"gradient_checkpointing={'false' if args.no_gradient_checkpointing else 'true'}",
        f"data.seq_len={args.seq_len}", "data.shuffle=false",
    ]
    cfg = TrainConfig.from_yaml(args.recipe, fixed + list(overrides))
    cfg.model_config = dict(model_config)
    return cfg.validate()


def run(args, overrides: list[str]) -> dict | None:
    from transformers import AutoConfig

    from trainkv.training import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    name, model_config = model_config_from(args.model_config)
    cfg = build_config(args, overrides, model_config, world)
    settings = dict(model_config)
    hf_config = AutoConfig.for_model(settings.pop("model_type", "llama"), **settings)
    if args.seq_len > hf_config.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{hf_config.max_position_embeddings}")
    steps = args.warmup + args.steps
    rows = random_rows(steps * args.batch_size * world, args.seq_len, hf_config.vocab_size, cfg.seed)
    t0 = time.perf_counter()
    result = train(cfg, dataset=rows)
    wall = time.perf_counter() - t0

    from accelerate.state import AcceleratorState

    state = AcceleratorState()  # the trainer has ended its process group: no collectives from here on
    if not state.is_main_process:
        return None
    on_gpu = torch.cuda.is_available() and state.device.type == "cuda"
    device = torch.cuda.get_device_name(state.device) if on_gpu else "cpu"
    summary = json.loads((Path(cfg.output_dir) / "train_summary.json").read_text())
    allocated = summary.get("max_memory_gib_per_process") or [None] * summary["num_processes"]
    reserved = summary.get("max_memory_reserved_gib_per_process") or [None] * summary["num_processes"]
    per_process = [{"rank": i, "peak_allocated_gib": a, "peak_reserved_gib": r}
                   for i, (a, r) in enumerate(zip(allocated, reserved))]
    history = result.history
    timed = history[args.warmup:]
    if not timed:
        raise SystemExit("no timed steps: raise --steps")
    times = [r["step_time_s"] for r in timed]
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in timed]
    tokens_per_s = sum(tokens) / sum(times)
    global_batch = summary["global_batch"]
    processes = summary["num_processes"]
    method = cfg.method["method"]
    teacher = "kl" in str(cfg.method.get("loss", "kl"))
    flops = flops_per_sequence(hf_config, args.seq_len, teacher, cfg.gradient_checkpointing)
    sequences_per_s = tokens_per_s / args.seq_len
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_tflops(device)
    mfu = hfu = achieved = None
    if method in FLOP_METHODS:
        achieved = flops.model * sequences_per_s / processes / 1e12
        if peak:
            mfu = achieved / peak
            hfu = flops.hardware * sequences_per_s / processes / 1e12 / peak
    zero_stage = int(state.deepspeed_plugin.zero_stage) if state.deepspeed_plugin is not None else None
    return {
        "benchmark": "train_throughput",
        "model": f"{name}, RANDOM weights (speed and memory do not depend on weight values)",
        "weights": "random",
        "model_config": model_config,
        "dtype": summary["dtype"],
        "mixed_precision": summary["mixed_precision"],
        "recipe": os.path.relpath(args.recipe, ROOT) if Path(args.recipe).is_absolute() else args.recipe,
        "method": cfg.method,
        "eviction": cfg.eviction,
        "overrides": overrides,
        "launcher": {"num_processes": processes, "distributed_type": summary["distributed_type"],
                     "zero_stage": zero_stage},
        "seq_len": args.seq_len,
        "batch_size_per_gpu": args.batch_size,
        "global_batch_sequences": global_batch,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "warmup_steps": args.warmup,
        "timed_steps": len(timed),
        "step_time_s": {"mean": statistics.fmean(times), "median": statistics.median(times), "min": min(times),
                        "max": max(times), "all": times},
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / processes,
        "sequences_per_s": sequences_per_s,
        "flops": {**asdict(flops), "counted_for_method": method in FLOP_METHODS},
        "achieved_model_tflops_per_gpu": achieved,
        "peak_tflops_per_gpu": peak,
        "peak_source": peak_source,
        "mfu": mfu,
        "hfu": hfu,
        "device": device,
        "per_process": per_process,
        "peak_allocated_gib_max": max(allocated) if on_gpu else None,
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "losses": [r["loss"] for r in history],
        "wall_time_s": wall,
        "command": args.label or " ".join(shlex.quote(a) for a in sys.argv),
        "launcher_env": {k: v for k, v in sorted(os.environ.items())
                         if k.startswith("ACCELERATE_") or k in ("WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE")},
        "environment": environment(),
    }


# --- combining runs -----------------------------------------------------------------------------------


def combine(paths: list[str]) -> dict:
    """Scaling table: each run's tokens/s against the smallest process count's (weak scaling, same batch per GPU)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for p, r in zip(paths, runs):
        if r.get("benchmark") != "train_throughput":
            raise SystemExit(f"{p} is not a train_throughput result")
    base = min(runs, key=lambda r: r["launcher"]["num_processes"])
    n0, tps0 = base["launcher"]["num_processes"], base["tokens_per_s"]
    devices = {r["device"] for r in runs}
    rows = []
    for path, r in zip(paths, runs):
        n = r["launcher"]["num_processes"]
        rows.append({
            "file": os.path.basename(path), "num_processes": n, "distributed_type": r["launcher"]["distributed_type"],
            "zero_stage": r["launcher"]["zero_stage"], "tokens_per_s": r["tokens_per_s"],
            "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "step_time_s_median": r["step_time_s"]["median"],
            "mfu": r["mfu"], "peak_allocated_gib_max": r["peak_allocated_gib_max"],
            "speedup": r["tokens_per_s"] / tps0, "scaling_efficiency": (r["tokens_per_s"] / tps0) / (n / n0),
        })
    return {
        "benchmark": "train_throughput_scaling",
        "model": base["model"], "seq_len": base["seq_len"], "batch_size_per_gpu": base["batch_size_per_gpu"],
        "scaling": "weak (batch per GPU fixed); efficiency = tokens/s(N) / (N/N0 * tokens/s(N0)), N0 = "
                   f"{n0} process(es)",
        "devices": sorted(devices),
        "same_device_kind": len(devices) == 1,
        "rows": rows,
        "environment": environment(),
    }


def markdown(table: dict) -> str:
    lines = ["| GPUs | launcher | tokens/s | tokens/s/GPU | step s | MFU | peak GiB | efficiency |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in table["rows"]:
        launcher = f"ZeRO-{r['zero_stage']}" if r["zero_stage"] else r["distributed_type"].split(".")[-1]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_allocated_gib_max']:.1f}" if r["peak_allocated_gib_max"] is not None else "-"
        lines.append(f"| {r['num_processes']} | {launcher} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
                     f"{r['step_time_s_median']:.2f} | {mfu} | {mem} | {100 * r['scaling_efficiency']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    out = Path(args.output)
    if args.combine:
        table = combine(args.combine)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=2))
        out.with_suffix(".md").write_text(markdown(table) + "\n")
        print(markdown(table))
        print(f"wrote {out}")
        return
    payload = run(args, overrides)
    if payload is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    mfu = f"{100 * payload['mfu']:.1f}%" if payload["mfu"] is not None else "n/a"
    mem = payload["peak_allocated_gib_max"]
    print(f"train_throughput: {payload['launcher']['num_processes']} process(es), {payload['tokens_per_s']:.0f} tokens/s, "
          f"median step {payload['step_time_s']['median']:.3f} s, MFU {mfu}, peak "
          f"{'n/a' if mem is None else f'{mem:.1f} GiB'}; wrote {out}")


if __name__ == "__main__":
    main()
