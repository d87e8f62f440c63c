"""Gradient checkpointing that replays the eviction method's forward state in the recomputation.

Methods steer their training forwards with plain attributes of their modules, set by
``training_loss`` around ``model(...)`` and reset afterwards (Attention-Gate's ``soft_eviction``,
Locret's ``_request``, ...), and hand results back the same way (``last_logits``, ``last``).
With gradient checkpointing, backward re-runs each decoder layer's forward *after*
``training_loss`` has reset those attributes, so the recomputation would take another path than
the forward (torch raises ``CheckpointError: ... different number of tensors``) or silently compute
other gradients.

`enable_gradient_checkpointing` turns on transformers' (non-reentrant) checkpointing with a
``context_fn``: when a layer's forward runs, it snapshots the attributes of every method module
(everything in the instance ``__dict__`` that is not `nn.Module` bookkeeping); the recomputation of
that layer runs with the snapshot in place, and afterwards the attributes are put back as they were
just before the recomputation, so nothing the recomputation writes (e.g. ``last_logits``) outlives it.
No method needs to know about checkpointing.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from ..methods.base import EvictionMethod, method_modules

_MODULE_KEYS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (training, _parameters, hooks, ...)


def _state(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if k not in _MODULE_KEYS}


def _restore(module: nn.Module, state: dict) -> None:
    for key in [k for k in vars(module) if k not in _MODULE_KEYS and k not in state]:
        del module.__dict__[key]
    module.__dict__.update(state)


class ReplayState:
    """Context manager: run a block with the modules' attributes of an earlier snapshot, then restore them."""

    def __init__(self, modules: list[nn.Module], snapshot: list[dict]):
        self.modules = modules
        self.snapshot = snapshot
        self.saved: list[dict] = []

    def __enter__(self):
        self.saved = [_state(m) for m in self.modules]
        for module, state in zip(self.modules, self.snapshot):
            _restore(module, state)
        return self

    def __exit__(self, *exc):
        for module, state in zip(self.modules, self.saved):
            _restore(module, state)
        self.saved = []
        return False


def replay_context_fn(modules: list[nn.Module]):
    """``context_fn`` for `torch.utils.checkpoint.checkpoint`: (nothing at forward, replay at recompute)."""
    modules = list(modules)

    def context_fn():
        return contextlib.nullcontext(), ReplayState(modules, [_state(m) for m in modules])

    return context_fn


def stateful_modules(model: nn.Module) -> list[nn.Module]:
    """Every eviction-method module on the model, nested ones included (e.g. layer_budget's base scorer)."""
    return [sub for top in method_modules(model) for sub in top.modules() if isinstance(sub, EvictionMethod)]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, replaying the method's state (module doc)."""
    kwargs = {"use_reentrant": False, "context_fn": replay_context_fn(stateful_modules(model))}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


__all__ = ["ReplayState", "enable_gradient_checkpointing", "replay_context_fn", "stateful_modules"]
