"""Where the device time of a run goes: trainkv's scoring and eviction against everything else.

Runs a callable once under `torch.profiler` with trainkv's named ranges on (`trainkv.profiling`) and
sums the device time of the kernels launched inside ``trainkv::score`` / ``trainkv::evict``, the device
time of all kernels, and the wall time (the profiler slows the host side, so use shares, not seconds).
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from trainkv import profiling


def _kernels_under(event) -> tuple[int, float]:
    """(kernel count, kernel device microseconds) launched by ``event`` and its descendants."""
    count, us = 0, 0.0
    stack = [event]
    while stack:
        e = stack.pop()
        for k in getattr(e, "kernels", []) or []:
            count += 1
            us += float(getattr(k, "duration", 0.0) or 0.0)
        stack.extend(e.cpu_children)
    return count, us


def device_time_shares(fn, ranges=(profiling.SCORE, profiling.EVICT)) -> dict:
    """Profile ``fn()`` once; device time in each trainkv range and in total, kernels per range call."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiling.enable(True)
    try:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
    finally:
        profiling.enable(False)
    events = prof.events()
    # every kernel once, through the host op that launched it (device-side annotation events are not kernels)
    total_us = sum(float(k.duration) for e in events if e.device_type == DeviceType.CPU for k in e.kernels)
    out = {"wall_seconds_profiled": round(wall, 3), "device_kernel_seconds": round(total_us / 1e6, 4)}
    for name in ranges:
        calls = [e for e in events if e.name == name and e.device_type == DeviceType.CPU]
        kernels, us = 0, 0.0
        for e in calls:
            k, t = _kernels_under(e)
            kernels, us = kernels + k, us + t
        key = name.split("::")[-1]
        out[key] = {
            "calls": len(calls),
            "device_seconds": round(us / 1e6, 4),
            "share_of_device_time": round(us / total_us, 4) if total_us else None,
            "kernels_per_call": round(kernels / len(calls), 1) if calls else None,
            "host_ms_per_call_profiled": round(sum(e.cpu_time_total for e in calls) / len(calls) / 1e3, 3) if calls else None,
        }
    if total_us:
        out["device_busy_fraction"] = round(total_us / 1e6 / wall, 3)
    return out
