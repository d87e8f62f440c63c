"""benchmarks/decode_latency.py (issue 19) in its CPU smoke mode: one JSON per run with the environment, the command,
the measured bandwidth and, per row, decode tokens/s against its roofline; trainkv's static rows keep the budget;
a run stopped mid-way keeps the rows it finished; the plan prints the H200 commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import env_for_subprocess

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "decode_latency.py"
CONTEXTS, BUDGETS, BATCHES, STEPS = [96, 160], [32, 48], [1, 2], 4


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env_for_subprocess(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode_latency") / "smoke.json"
    proc = run("--smoke", "--contexts", *map(str, CONTEXTS), "--budgets", *map(str, BUDGETS),
               "--batches", *map(str, BATCHES), "--steps", str(STEPS), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_one_json_with_environment_and_command(smoke):
    data, stdout = smoke
    for key in ("date", "torch", "transformers", "device"):
        assert data["environment"][key]
    assert "decode_latency.py" in data["command"] and "--smoke" in data["command"]
    assert data["complete"] is True
    assert data["bandwidth"]["bytes_per_s"] > 1e8
    assert data["settings"]["contexts"] == CONTEXTS and data["settings"]["budgets"] == BUDGETS
    assert "python3 benchmarks/decode_latency.py --model llama3.1-8b-random" in stdout
    assert "--model smollm2-135m" in stdout


def test_every_row_is_measured_against_its_roofline(smoke):
    data, _ = smoke
    rows = data["rows"]
    want = {(r, c, b, None) for r in ("hf_dynamic", "hf_static_compiled") for c in CONTEXTS for b in BATCHES}
    want |= {(r, c, b, k) for r in ("trainkv_eager", "trainkv_static", "trainkv_graphed") for c in CONTEXTS
             for b in BATCHES for k in BUDGETS}
    assert {(r["row"], r["context"], r["batch"], r["budget"]) for r in rows} == want
    assert len(rows) == len(want)
    shape = data["shape"]
    for r in rows:
        assert "skipped" not in r and "error" not in r, r
        assert r["decode_tokens_per_s"] > 0 and r["timed_tokens"] == STEPS
        roof = r["roofline"]
        entries = roof["kv_entries_read_per_row"]
        assert roof["kv_bytes"] == r["batch"] * entries * shape["kv_bytes_per_entry"]
        assert roof["step_bytes"] == shape["weight_bytes_read_per_step"] + roof["kv_bytes"]
        assert roof["tokens_per_s"] == pytest.approx(r["batch"] * data["bandwidth"]["bytes_per_s"] / roof["step_bytes"],
                                                     rel=1e-3)
        assert 0 < roof["fraction"] == pytest.approx(r["decode_tokens_per_s"] / roof["tokens_per_s"], abs=2e-3)
        if r["row"] == "hf_dynamic":
            assert entries >= r["context"]


def test_trainkv_rows_keep_the_budget(smoke):
    data, _ = smoke
    for r in data["rows"]:
        if not r["row"].startswith("trainkv"):
            continue
        budget = r["budget"]
        assert r["kept_min"] == r["kept_max"] == budget, r  # every context is longer than every budget
        assert r["tokens_seen"] == r["context"] + r["new_tokens"] - 1
        if r["row"] == "trainkv_eager":
            assert r["static_slots"] is None and r["roofline"]["kv_entries_read_per_row"] == budget + 1
        else:
            assert r["static_slots"] == -(-(budget + 1) // 8) * 8 == r["roofline"]["kv_entries_read_per_row"]
        if r["row"] == "trainkv_graphed":  # on CPU the graph runner runs emulated: captured once, then replayed
            assert r["graphs_emulated"] and r["graphs"]["captures"] == 1 and r["graphs"]["replays"] >= STEPS
            assert r["graph_failures"] == []
            # the same graph without generate: measured, and never slower per token than through generate by much
            assert "forward_only_error" not in r and r["forward_only_tokens_per_s"] > 0
            assert r["forward_only_step_ms"] == pytest.approx(1e3 * r["batch"] / r["forward_only_tokens_per_s"], rel=0.01)


def test_the_linear_floor_reads_every_linear_weight_once(smoke):
    data, _ = smoke
    assert set(data["linear_floor"]) == {str(b) for b in BATCHES}
    for b, floor in data["linear_floor"].items():
        # the tiny model: 2 layers x 7 projections + the LM head; weights read = all parameters but the embedding
        assert floor["batch"] == int(b) and floor["linears"] == 15 and floor["ms"] > 0
        # everything a step reads but the five RMSNorm weight vectors (hidden size 64, fp32)
        assert floor["weight_bytes"] == data["shape"]["weight_bytes_read_per_step"] - 5 * 64 * 4
        assert floor["bytes_per_s"] == pytest.approx(floor["weight_bytes"] / (floor["ms"] / 1e3), rel=0.01)


def test_a_stopped_run_keeps_its_finished_rows(tmp_path):
    out = tmp_path / "partial.json"
    proc = run("--smoke", "--contexts", "96", "--budgets", "32", "--batches", "1", "--steps", "2", "--stop-after", "3",
               "--out", str(out))
    assert proc.returncode != 0  # stopped like a killed run
    data = json.loads(out.read_text())
    assert data["complete"] is False and len(data["rows"]) == 3


def test_plan_estimates_every_row_and_prints_the_commands():
    proc = run("--plan", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llama3.1-8b-random: 66 rows" in proc.stdout and "smollm2-135m: 66 rows" in proc.stdout
    assert "skipped: needs" in proc.stdout  # the 128K batch-8 full cache does not fit the 8B on one H200
    assert proc.stdout.count("PYTHONUNBUFFERED=1 python3 benchmarks/decode_latency.py") == 2
