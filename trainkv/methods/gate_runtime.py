"""The Attention-Gate's scoring function as one pure function, and its optional `torch.compile`.

`gate_scores` is the whole gate for ``c`` new tokens: one fused input projection (q, k, v and the
direct path in a single matmul), the sliding-window attention over ``[ring buffer, new keys]`` and
the output projection. Training (whole sequences, ring = invalid zeros) and the runtime (chunks,
ring = the last ``gate_window`` gate keys/values) call the same function, so their numbers agree by
construction.

Compiling it is a run-time option, not part of any checkpoint:

    from trainkv.methods import gate_runtime
    gate_runtime.configure(compile=True)          # or TRAINKV_COMPILE_GATE=1 in the environment

On by request only, and only on CUDA unless ``compile_on_cpu``. If compiling (or a recompile for a
new shape) fails, a warning is printed once and the eager function is used from then on.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from .window_attention import sliding_window_attention

ENV_VAR = "TRAINKV_COMPILE_GATE"


@dataclass(frozen=True)
class GateRuntimeOptions:
    """compile: compile the gate's scoring at run time (None: the ``TRAINKV_COMPILE_GATE`` environment
    variable decides: ``1``/``true`` = on). compile_on_cpu: also compile on CPU (off: CPU runs eager).
    backend / mode / dynamic: passed to `torch.compile`."""

    compile: bool | None = None
    compile_on_cpu: bool = False
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = False

    def compile_enabled(self, device: torch.device) -> bool:
        wanted = self.compile
        if wanted is None:
            wanted = os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")
        return bool(wanted) and (device.type == "cuda" or self.compile_on_cpu)


_OPTIONS = GateRuntimeOptions()


def options() -> GateRuntimeOptions:
    return _OPTIONS


def configure(**changes) -> GateRuntimeOptions:
    """Change the run-time options (see `GateRuntimeOptions`); resets the compiled function."""
    global _OPTIONS
    _OPTIONS = replace(_OPTIONS, **changes)
    _COMPILED.reset()
    return _OPTIONS


def gate_scores(hidden: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
                ring: torch.Tensor, mask: torch.Tensor | None, heads: int, head_dim: int, window: int):
    """Keep-logits ``[B, Hkv, c]`` of ``c`` new tokens, and the new ring buffer.

    hidden ``[B, c, hidden]``; w_in ``[3*heads*head_dim + Hkv (+ zero rows), hidden]`` (qkv rows, then the
    direct path's, then optional padding); w_out/b_out the output projection; ring ``[B, window, 2, heads, head_dim]`` the gate
    keys/values of the ``window`` positions before the new tokens; mask from `window_mask`.
    Returns ``(logits, ring')`` with ring' the last ``window`` rows of ``[ring, new keys/values]``.
    """
    b, c, _ = hidden.shape
    inner = heads * head_dim
    y = F.linear(hidden, w_in)  # [B, c, 3*inner + Hkv]
    q = y[..., :inner].unflatten(-1, (heads, head_dim))
    kv = torch.cat([ring, y[..., inner:3 * inner].unflatten(-1, (2, heads, head_dim))], dim=1)  # [B, W + c, 2, h, d]
    ctx = sliding_window_attention(q, kv, window, mask).reshape(b, c, inner)
    logits = F.linear(ctx, w_out, b_out) + y[..., 3 * inner:3 * inner + w_out.shape[0]]
    return logits.transpose(1, 2), kv[:, c:]


class _CompiledGate:
    """`gate_scores` through `torch.compile`, built on first use, eager for good after a failure."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.fn = None
        self.failed: str | None = None

    def __call__(self, *args):
        if self.failed is None:
            try:
                if self.fn is None:
                    opts = options()
                    self.fn = torch.compile(gate_scores, backend=opts.backend, mode=opts.mode, dynamic=opts.dynamic)
                return self.fn(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self.failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"trainkv: compiling the Attention-Gate failed, running it eagerly ({self.failed[:300]})",
                              RuntimeWarning, stacklevel=2)
        return gate_scores(*args)


_COMPILED = _CompiledGate()


def run_gate(*args, device: torch.device):
    """`gate_scores(*args)`, compiled when the options ask for it on this device."""
    if options().compile_enabled(device) and not torch.is_grad_enabled():
        return _COMPILED(*args)
    return gate_scores(*args)


def compile_status() -> dict:
    """What the compiled path did so far (for benchmark records)."""
    return {"options": asdict(_OPTIONS),
            "compiled": _COMPILED.fn is not None and _COMPILED.failed is None, "failure": _COMPILED.failed}


__all__ = ["ENV_VAR", "GateRuntimeOptions", "compile_status", "configure", "gate_scores", "options", "run_gate"]
