"""Provenance of every result file: versions, device, date, sample digests, atomic JSON writes, aggregates."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers

from trainkv._version import __version__
from trainkv.data.sample import Sample


def package_versions() -> dict[str, str]:
    return {
        "trainkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def samples_digest(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.to_kvpress_row(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_json(path: Path, payload: dict) -> None:
    """Atomic write (a killed sweep never leaves half a file that resuming would trust)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score over all samples (0-100), per task, and the mean measured compression."""
    if not results:
        return {"score": math.nan, "n": 0, "per_task": {}, "compression_mean": math.nan}
    per_task: dict[str, list[float]] = {}
    for r in results:
        per_task.setdefault(r["task"], []).append(r["score"])
    return {
        "score": sum(r["score"] for r in results) / len(results),
        "n": len(results),
        "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
        "compression_mean": sum(r["compression"] for r in results) / len(results),
        "context_tokens_mean": sum(r["context_tokens"] for r in results) / len(results),
    }


__all__ = ["aggregate", "device_name", "now", "package_versions", "samples_digest", "write_json"]
