"""The shipped SmolLM2 checkpoints load offline, evict to their budget and reproduce committed evaluation samples.

The committed run files (``results/smollm2/runs/<method>__L1024__r0.125.json``, made on an H200 with batches of
64) hold each sample's prediction; the same sample evaluated here on the CPU, alone, must give the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainkv.eval.runner import Sweep, SweepConfig
from trainkv.hub.format import file_sha256

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["niah_single_1", "niah_multikey_1"]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["attention_gate", "retaining_head"])
def test_shipped_checkpoint_reproduces_committed_samples(smollm, tmp_path, method):
    model, tok = smollm
    ckpt = ROOT / "checkpoints" / "smollm2-135m" / method
    committed = json.loads((ROOT / "results" / "smollm2" / "runs" / f"{method}__L1024__r0.125.json").read_text())
    assert committed["config"]["method"]["weights_sha256"] == file_sha256(ckpt / "model.safetensors")[:16]
    config = SweepConfig(methods=[method], checkpoints={method: str(ckpt)}, keep=[0.125], tasks=TASKS,
                         context_lengths=[1024], samples=1, seed=committed["config"]["seed"], output=str(tmp_path),
                         device="cpu", progress=False)
    Sweep(config, model=model, tokenizer=tok).run()
    ours = json.loads((tmp_path / "runs" / f"{method}__L1024__r0.125.json").read_text())
    assert ours["config"]["eviction"] == committed["config"]["eviction"]  # incl. the checkpoint's own recent window
    theirs = {(r["task"], r["index"]): r for r in committed["results"]}
    assert sorted(r["task"] for r in ours["results"]) == sorted(TASKS)  # one sample of each task was compared
    for r in ours["results"]:
        ref = theirs[(r["task"], r["index"])]
        assert r["kept_max"] == ref["kept_max"] == 128  # 1/8 of 1024 entries per layer and KV head
        assert r["prediction"] == ref["prediction"], (method, r["task"])
    assert not hasattr(model, "trainkv_state")
