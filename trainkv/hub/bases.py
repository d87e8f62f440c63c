"""The trained scorer under a ``layer_budget`` method: its settings and weights, read from its checkpoint.

A ``layer_budget`` config names a trained Attention-Gate / Locret checkpoint as ``base_checkpoint``; the method
itself does no I/O. Where a model is built for training (the trainer, ``python -m trainkv.training.layer_budget``):

    method = resolve_base(make_config(method_dict))     # the base's saved settings merged in
    attach(model, method, eviction)
    load_base_weights(model)                             # its weights copied into every layer's base

A trained ``layer_budget`` checkpoint holds its base's weights too, so `trainkv.load_gated` needs neither.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from ..methods.base import MethodConfig, method_modules
from ..methods.layer_budget import LayerBudgetConfig
from .checkpoint import GateCheckpoint
from .format import read_config
from .resolve import resolve_checkpoint


def resolve_base(method: MethodConfig) -> MethodConfig:
    """A ``layer_budget`` config with its base's settings filled in from ``base_checkpoint`` (keys given in
    ``base`` override them); any other config unchanged. Refuses a base of another method than the one asked
    for, and a base carrying LoRA (a layer_budget base must leave the backbone unchanged)."""
    if not isinstance(method, LayerBudgetConfig) or not method.base_checkpoint:
        return method
    saved = read_config(resolve_checkpoint(method.base_checkpoint))
    if saved.get("lora"):
        raise ValueError(f"layer_budget: {method.base_checkpoint} carries LoRA weights; a layer_budget base must leave "
                         "the backbone unchanged")
    base = dict(saved["method"])
    if method.base is not None and method.base["method"] != base["method"]:
        raise ValueError(f"layer_budget: base says method {method.base['method']!r}, but {method.base_checkpoint} "
                         f"holds {base['method']!r}")
    asked = {k: v for k, v in (method.base or {}).items() if k != "method"}
    return dataclasses.replace(method, base={**base, **asked})


def load_base_weights(model: nn.Module) -> None:
    """Copy the ``base_checkpoint`` weights into each attached ``layer_budget`` module (no-op for other methods
    or without a base checkpoint)."""
    mods = method_modules(model)
    config = mods[0].config
    if not isinstance(config, LayerBudgetConfig) or not config.base_checkpoint:
        return
    tensors = GateCheckpoint.load(resolve_checkpoint(config.base_checkpoint)).tensors
    for i, module in enumerate(mods):
        prefix = f"layers.{i}."
        module.load_base({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, config.base_checkpoint)


__all__ = ["load_base_weights", "resolve_base"]
