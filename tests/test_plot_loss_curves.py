"""benchmarks/plot_loss_curves.py on made-up metrics: the match verdicts, the noise estimate, the files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark



@pytest.fixture(scope="module")
def plc():
    return load_benchmark("plot_loss_curves")


def write_run(path: Path, losses: list[float], start: int = 1) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps({"step": start + i, "loss": x, "kl": x / 2, "lr": 1e-3}) for i, x in enumerate(losses)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_verdicts_noise_and_files(tmp_path, plc):
    rng = random.Random(0)
    steps = 200
    trend = [2.0 * math.exp(-i / 40) + 0.5 for i in range(steps)]
    batch_noise = [rng.gauss(0, 0.05) for _ in range(steps)]  # same batches: shared by the matching runs
    ref = [t + n for t, n in zip(trend, batch_noise)]
    same = [x + rng.gauss(0, 0.002) for x in ref]  # e.g. 2 GPUs, same data: bf16-level differences
    off = [x + 0.3 for x in ref]  # a broken run
    other_seed = [t + rng.gauss(0, 0.05) for t in trend]  # other data order: independent batch noise
    resumed = same[100:]  # a resumed run logs only its later steps
    runs = [f"1 GPU={write_run(tmp_path / 'ref', ref)}", f"2 GPUs={write_run(tmp_path / 'same', same)}",
            f"broken={write_run(tmp_path / 'off', off)}", f"resumed={write_run(tmp_path / 'res', resumed, start=101)}"]
    out = tmp_path / "out"
    argv = [a for r in runs for a in ("--run", r)] + ["--noise-run", f"seed 2={write_run(tmp_path / 'seed', other_seed)}",
                                                       "--output-dir", str(out), "--window", "9"]
    plc.main(argv)
    result = json.loads((out / "loss_match.json").read_text())
    assert result["reference"] == "1 GPU" and set(result["keys"]) == {"loss", "kl"}
    loss = result["keys"]["loss"]
    assert 0.03 < loss["sigma_step"] < 0.07  # ~ the 0.05 batch noise put on each step
    assert loss["runs"]["2 GPUs"]["matches_within_noise"] is True
    assert loss["runs"]["2 GPUs"]["within_3_sigma_step"] is True and loss["runs"]["2 GPUs"]["below_seed_spread"] is True
    assert loss["runs"]["broken"]["within_3_sigma_step"] is False
    assert loss["runs"]["2 GPUs"]["max_abs_diff"] < 0.01
    assert loss["runs"]["broken"]["matches_within_noise"] is False
    assert loss["runs"]["broken"]["max_abs_diff"] == pytest.approx(0.3)
    assert loss["runs"]["resumed"]["common_steps"] == 100 and loss["runs"]["resumed"]["first_step"] == 101
    assert loss["seed_spread"]["mean_abs_diff"] > 0.03
    assert loss["runs"]["2 GPUs"]["mean_abs_diff_over_seed_spread"] < 0.1
    assert (out / "loss_curves.png").stat().st_size > 10_000
    md = (out / "loss_match.md").read_text()
    assert "| 2 GPUs | 1-200 |" in md and "| broken |" in md and "NO |" in md
