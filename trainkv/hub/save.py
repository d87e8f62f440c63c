"""`save_gated`: write the attached method (and LoRA, if any) of a model as a gate checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from .._version import __version__
from ..methods.base import method_state_dict
from .checkpoint import GateCheckpoint
from .format import (
    FORMAT_VERSION, LORA_PREFIX, base_model_name, base_revision, base_shape, config_hash, to_jsonable,
)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_state(model: nn.Module) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """The peft LoRA config (JSON-ready) and tensors (keys under ``lora.``) of a model, or ``(None, {})``."""
    if not _lora_layers(model):
        return None, {}
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError("the model has LoRA layers but no peft_config; inject them with peft.inject_adapter_in_model")
    if len(configs) > 1:
        raise ValueError(f"the model carries several LoRA adapters {sorted(configs)}; a gate checkpoint holds one")
    (adapter, lora_config), = configs.items()
    tensors = get_peft_model_state_dict(model, adapter_name=adapter)
    config = to_jsonable(lora_config.to_dict())
    return config, {LORA_PREFIX + k: v for k, v in tensors.items()}


def checkpoint_config(model: nn.Module) -> dict:
    """The ``config.json`` dict of a model with an attached method (without ``weights_sha256``)."""
    state = getattr(model, "trainkv_state", None)
    if state is None:
        raise ValueError("no trainkv method is attached to this model; call trainkv.attach first")
    shape = base_shape(model)
    base = base_model_name(model)
    if not base:
        raise ValueError(
            "cannot tell the base model: set model.config.trainkv_base_model to its Hub id (trainkv.load_model sets it)"
        )
    return {
        "format_version": FORMAT_VERSION,
        "trainkv_version": __version__,
        "base_model": base,
        "base_revision": base_revision(model),
        "base_config_hash": config_hash(shape),
        "base_shape": shape,
        "method": state.method.to_dict(),
        "eviction": state.eviction.to_dict(),
    }


def to_checkpoint(model: nn.Module, eval_table: str | None = None, card_name: str | None = None) -> GateCheckpoint:
    """A `GateCheckpoint` of a model's attached method (and LoRA): config and tensors, in memory."""
    config = checkpoint_config(model)
    tensors = dict(method_state_dict(model))
    lora_config, lora_tensors = lora_state(model)
    if lora_config is not None:
        config["lora"] = lora_config
        tensors.update(lora_tensors)
    return GateCheckpoint(config, tensors, eval_table=eval_table, card_name=card_name)


def save_gated(model: nn.Module, path: str | Path, eval_table: str | None = None, *, repo_id: str | None = None) -> Path:
    """Save the method attached to ``model`` (and its LoRA layers, if any) as a gate checkpoint in ``path``.

    Writes ``model.safetensors``, ``config.json`` and ``README.md`` (with ``eval_table``, a markdown
    table, if given; ``repo_id`` is the name shown in the card's usage snippet). Returns the directory.
    """
    path = Path(path)
    to_checkpoint(model, eval_table=eval_table, card_name=repo_id or str(path)).save_pretrained(path)
    return path
