"""Shared helpers for the GPU/CPU benchmarks: model construction, timing, memory, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def llama31_8b_random(device: str = "cuda", dtype=torch.bfloat16, max_positions: int = 131072):
    """Llama-3.1-8B architecture with random weights (speed and memory do not depend on weight values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA31_8B, "max_position_embeddings": max_positions})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.trainkv_base_model = "meta-llama/Llama-3.1-8B-Instruct (random weights, exact config)"
    return model.eval()


SMOKE = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, tie_word_embeddings=False)


def bench_model(smoke: bool = False, max_positions: int = 131072):
    """The 8B stand-in on CUDA, or (``smoke``) a tiny random Llama on the CPU to check a benchmark runs."""
    if not smoke:
        return llama31_8b_random(max_positions=max_positions)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOKE, max_position_embeddings=max_positions)).eval()
    model.config.trainkv_base_model = "tiny random Llama (smoke check, CPU)"
    return model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def measure():
    """Yields a dict that receives ``seconds`` and, on CUDA, ``peak_gib`` (max allocated during the block)."""
    out: dict = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    yield out
    sync()
    out["seconds"] = time.perf_counter() - start
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def environment() -> dict:
    import transformers

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    if torch.cuda.is_available():
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` (+ environment) to $OUT/<name>.json when set, else benchmarks/results/<name>.json."""
    root = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    print(f"wrote {path}")
    return path
