"""Named `torch.profiler` ranges around trainkv's run-time work (method scoring, eviction).

Off by default (a no-op context); benchmarks turn them on to attribute GPU time:

    trainkv.profiling.enable()
    with torch.profiler.profile(...) as prof: model.generate(...)
    # events "trainkv::score" / "trainkv::evict" carry the device time of the kernels they launched
"""

from __future__ import annotations

from contextlib import nullcontext

from torch.profiler import record_function

SCORE = "trainkv::score"
EVICT = "trainkv::evict"
_ENABLED = False
_NULL = nullcontext()


def enable(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = on


def scope(name: str):
    """``record_function(name)`` while enabled, else a shared no-op context."""
    return record_function(name) if _ENABLED else _NULL
