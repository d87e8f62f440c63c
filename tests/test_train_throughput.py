"""benchmarks/train_throughput.py: the FLOP model, the GPU peak table, and a CPU run of the real trainer on a tiny
random Llama (one process) whose JSON must be complete and self-consistent; --combine's scaling arithmetic."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark
from runtime_helpers import env_for_subprocess, run_launcher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def tp():
    return load_benchmark("train_throughput")


def test_flops_of_the_llama31_8b_config(tp):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**tp.LLAMA31_8B)
    t = 8192
    f = tp.flops_per_sequence(cfg, t, teacher=True, gradient_checkpointing=True)
    # 8.03B parameters = 6.98B in the 32 layers + 2 x 0.525B (embedding, LM head); the embedding is a lookup
    assert 7.50e9 < f.linear_params < 7.51e9
    attn = 2 * 32 * 32 * 128 * t * t
    assert f.matmul_forward == 2 * f.linear_params * t and f.attention_forward == attn
    assert f.model == pytest.approx(3 * 2 * f.linear_params * t + 4 * attn)
    assert f.hardware == pytest.approx(f.model + 2 * f.linear_params * t + attn)
    assert 4.3e14 < f.model < 4.5e14  # ~440 TFLOP per 8K-token sequence
    no_teacher = tp.flops_per_sequence(cfg, t, teacher=False, gradient_checkpointing=False)
    assert no_teacher.model == pytest.approx(f.model - f.matmul_forward - attn) and no_teacher.hardware == no_teacher.model
    assert "2*N*T" in f.formula and "recomputed" in f.formula and "recomputed" not in no_teacher.formula


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", None)])
def test_peak_table(tp, name, peak):
    assert tp.peak_tflops(name)[0] == peak


def test_cpu_run_writes_a_sane_json_and_combine(tmp_path, tp):
    out = tmp_path / "tp_1.json"
    env = env_for_subprocess()
    cmd = [sys.executable, str(SCRIPT), "--model-config", "tiny", "--seq-len", "96", "--warmup", "1", "--steps", "2",
           "--peak-tflops", "1.0", "--workdir", str(tmp_path / "work"), "--output", str(out),
           "eviction.chunk_size=32", "dtype=float32", "mixed_precision=no"]
    proc = run_launcher(cmd, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout
    r = json.loads(out.read_text())
    assert r["weights"] == "random" and "RANDOM weights" in r["model"]
    assert r["launcher"]["num_processes"] == 1 and r["global_batch_sequences"] == 1 and r["seq_len"] == 96
    assert r["gradient_checkpointing"] is True and r["method"]["method"] == "attention_gate"
    assert r["eviction"]["chunk_size"] == 32
    times = r["step_time_s"]["all"]
    assert r["timed_steps"] == len(times) == 2 and all(t > 0 for t in times)
    assert r["tokens_per_s"] == pytest.approx(2 * 96 / sum(times), rel=1e-6)
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"])
    assert r["achieved_model_tflops_per_gpu"] == pytest.approx(r["flops"]["model"] * r["sequences_per_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_model_tflops_per_gpu"] / 1.0) and r["hfu"] > r["mfu"] > 0
    assert r["flops"]["linear_params"] == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 512
    assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    assert 0 < r["trainable_parameters"] < r["total_parameters"]
    assert r["device"] == "cpu" and r["peak_allocated_gib_max"] is None and len(r["per_process"]) == 1
    assert {"date", "torch", "transformers"} <= set(r["environment"])
    assert "--model-config tiny" in r["command"]

    # a pretend 2-GPU run at 1.8x the tokens/s: 90% weak-scaling efficiency
    two = dict(r, launcher=dict(r["launcher"], num_processes=2), tokens_per_s=1.8 * r["tokens_per_s"],
               tokens_per_s_per_gpu=0.9 * r["tokens_per_s"])
    (tmp_path / "tp_2.json").write_text(json.dumps(two))
    table = tp.combine([str(out), str(tmp_path / "tp_2.json")])
    by_n = {row["num_processes"]: row for row in table["rows"]}
    assert by_n[1]["scaling_efficiency"] == pytest.approx(1.0)
    assert by_n[2]["speedup"] == pytest.approx(1.8) and by_n[2]["scaling_efficiency"] == pytest.approx(0.9)
    assert table["same_device_kind"] is True
    assert "90.0%" in tp.markdown(table)
