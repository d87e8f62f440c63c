"""Issue 8: the runtime's per-layer work (scoring, the eviction decision, the eviction) needs no host sync
when the host already knows the answer (every entry valid, budget mode), so a GPU never waits on the CPU
inside a forward. Checked on CPU by catching every op that would read a device value back
(``_local_scalar_dense`` behind ``.item()``/``bool()``/``int()``, ``nonzero``) during forwards.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainkv
from runtime_helpers import make_tiny, random_ids

READBACK = ("_local_scalar_dense", "nonzero", "masked_select")


class SyncSpy(TorchDispatchMode):
    """Records where every op that reads a tensor's value back to the host was called from."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in READBACK):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.calls.append(f"{func} at " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[-3:]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["streaming_llm", "attention_gate"])
@pytest.mark.parametrize("budget", [40, [[40, 48], [44, 40]]])
def test_prefill_and_decode_steps_have_no_host_sync(method, budget):
    model = make_tiny()
    eviction = dict(budget=40, chunk_size=24, sink_tokens=2, recent_window=8)
    if isinstance(budget, list):
        eviction["head_budgets"] = budget  # ragged heads after eviction: counts still known on the host
    trainkv.attach(model, method, trainkv.EvictionConfig(**eviction))
    ids = random_ids(130, batch=2)
    cache = model.new_cache()
    spy = SyncSpy()
    with torch.no_grad():
        for s in range(0, 96, 24):  # chunked prefill, evicting after each chunk
            with spy:
                model(ids[:, s:s + 24], cache=cache)
        for t in range(96, 130):  # decoding steps, evicting every step
            with spy:
                model(ids[:, t:t + 1], cache=cache, position_ids=torch.full((2, 1), t))
    assert cache.layers[0].keys.shape[-2] <= 48
    assert not spy.calls, "host syncs in the runtime:\n" + "\n".join(sorted(set(spy.calls)))
