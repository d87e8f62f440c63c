"""`load_gated`: find a gate checkpoint (`trainkv.hub.resolve`), load its base model, attach the method, load its weights.

The only part of `trainkv.hub` above `trainkv.attach` (docs/architecture.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from peft import PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from ..attach import attach, detach
from ..config import EvictionConfig
from ..methods import METHODS, make_config, method_modules, method_state_dict
from ..models import ALIASES, hub_offline, load_model
from .bases import load_base_weights, resolve_base
from .checkpoint import GateCheckpoint
from .format import UPGRADE, CheckpointError, CheckpointNotFoundError, LORA_PREFIX, base_model_name, base_shape, shape_mismatch
from .resolve import is_repo_id, resolve_checkpoint


def _alias_for(base: str) -> str | None:
    if base in ALIASES:
        return base
    for alias, entry in ALIASES.items():
        if entry.hub_repo == base:
            return alias
    return None


def load_base_model(config: dict, name: str, device=None, dtype=None) -> nn.Module:
    """Load the base model a checkpoint names, with `trainkv.load_model` (offline copies of aliases first)."""
    base, revision = config["base_model"], config.get("base_revision")
    kwargs = {"dtype": dtype or torch.float32, "device": device or "cpu"}
    alias = _alias_for(base)
    if alias is not None:
        return load_model(alias, **kwargs)
    if Path(base).expanduser().is_dir():
        return load_model(str(Path(base).expanduser()), **kwargs)
    if not is_repo_id(base):
        raise CheckpointNotFoundError(
            f"the checkpoint's base model {base!r} is neither a local directory nor a Hub repo id; "
            "load the base model yourself and pass it as model="
        )
    try:
        model = load_model(base, **kwargs, **({"revision": revision} if revision else {}))
    except OSError as e:
        at = f" --revision {revision}" if revision else ""
        where = "the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache" if hub_offline() \
            else "it could not be loaded"
        raise CheckpointNotFoundError(
            f"base model {base} of the gate checkpoint: {where} ({e}). Get it with `hf download {base}{at}` while "
            "online, or load it yourself and pass model="
        ) from e
    if revision:
        model.config.trainkv_base_revision = revision  # kept when the gates are saved again
    return model


def check_base(model: nn.Module, config: dict, source: str, allow_other_base: bool = False) -> None:
    """Refuse a model that is not the checkpoint's base model, naming both: another architecture always (with the
    fields that differ); another model of the same architecture unless ``allow_other_base`` (then a warning)."""
    saved = config["base_shape"]
    actual = base_shape(model)
    diff = shape_mismatch(saved, actual)
    name = base_model_name(model)
    if diff:
        raise CheckpointError(
            f"gate checkpoint {source} was trained for base model {config['base_model']!r}, but the model is "
            f"{name or type(model).__name__!r}, a different architecture "
            f"(checkpoint vs model: {'; '.join(diff)}). Load the checkpoint's base model, or use gates trained for "
            "this model"
        )
    if name and name != config["base_model"]:
        message = (f"gate checkpoint {source} was trained for base model {config['base_model']!r}; the model is "
                   f"{name!r}")
        if not allow_other_base:
            raise CheckpointError(
                f"{message}. Same architecture, but gates trained on other weights may evict poorly: load "
                f"{config['base_model']!r}, or pass allow_other_base=True (trainkv generate --allow-other-base) to "
                "use them anyway"
            )
        warnings.warn(f"{message} (allow_other_base=True: loading anyway; gates trained on other weights may evict "
                      "poorly)", stacklevel=3)


def _eviction_config(config: dict, eviction, overrides: dict, source: str) -> EvictionConfig:
    try:
        saved = EvictionConfig.from_dict(config["eviction"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"gate checkpoint {source}: its eviction settings do not load ({e}); it was written by trainkv "
            f"{config.get('trainkv_version', '?')}: {UPGRADE}"
        ) from e
    return saved.merged(eviction, **overrides)


def checkpoint_method_config(config: dict, source: str):
    name = config["method"]["method"]
    if name not in METHODS:
        raise CheckpointError(
            f"gate checkpoint {source} uses method {name!r}, which this trainkv does not know (known: "
            f"{', '.join(sorted(METHODS))}). It was written by trainkv {config.get('trainkv_version', '?')}: "
            f"{UPGRADE}, or import the module that registers the method first"
        )
    try:
        return make_config(config["method"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"gate checkpoint {source}: settings of method {name!r} do not load: {e}") from e


def _inject_lora(model: nn.Module, lora_config: dict, source: str) -> None:
    inject_adapter_in_model(PeftConfig.from_peft_type(**lora_config), model)


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], has_lora: bool, source: str) -> None:
    """Load method (and LoRA) tensors strictly: same keys, same shapes."""
    expected = {k: v.shape for k, v in method_state_dict(model).items()}
    given = {k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)}
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    problems = []
    if missing := sorted(set(expected) - set(given)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(given) - set(expected)):
        problems.append(f"unexpected {unexpected}")
    problems += [f"{k}: shape {tuple(given[k].shape)} vs {tuple(s)}" for k, s in expected.items()
                 if k in given and given[k].shape != s]
    if lora and not has_lora:
        problems.append("LoRA tensors without a LoRA config")
    if has_lora:
        want = get_peft_model_state_dict(model)
        if set(want) != set(lora):
            problems.append(f"LoRA keys differ: missing {sorted(set(want) - set(lora))}, "
                            f"unexpected {sorted(set(lora) - set(want))}")
    if problems:
        raise CheckpointError(f"gate checkpoint {source}: weights do not match the method: {'; '.join(problems)}")
    for i, module in enumerate(method_modules(model)):
        prefix = f"layers.{i}."
        module.load_state_dict({k[len(prefix):]: v for k, v in given.items() if k.startswith(prefix)}, strict=True)
    if has_lora:
        set_peft_model_state_dict(model, lora)


def load_gated(name: str | os.PathLike, model: nn.Module | None = None, eviction: EvictionConfig | dict | None = None,
               device=None, dtype: torch.dtype | None = None, *, revision: str | None = None, token=None,
               endpoint: str | None = None, cache_dir=None, allow_other_base: bool = False,
               **eviction_overrides) -> nn.Module:
    """Load a base model with trained eviction gates attached; its ``generate`` evicts.

    ``name``: a model alias (``checkpoints/<alias>/`` first, then the alias's Hub gates repo), a local
    checkpoint directory, or a Hub repo id (see `trainkv.hub.load`). ``model``: use this base model
    instead of loading the checkpoint's (its architecture must match). ``eviction`` (an
    `EvictionConfig`, replacing the checkpoint's settings, or a dict of overrides) and
    ``eviction_overrides`` (e.g. ``budget=128``) change the settings the checkpoint was trained with;
    ``generate(..., eviction={...})`` changes them per call. ``revision``, ``token``, ``endpoint`` and
    ``cache_dir`` go to huggingface_hub for Hub repos. A checkpoint trained for another base model is refused
    (naming both) unless ``allow_other_base`` and the architecture matches.
    """
    source = os.fspath(name)
    directory = resolve_checkpoint(source, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    ckpt = GateCheckpoint.load(directory)
    config = ckpt.config
    method_config = checkpoint_method_config(config, source)
    eviction_config = _eviction_config(config, eviction, eviction_overrides, source)
    if model is None:
        model = load_base_model(config, source, device=device, dtype=dtype)
    elif hasattr(model, "trainkv_state"):
        raise ValueError("a trainkv method is already attached to this model; call trainkv.detach(model) first")
    check_base(model, config, source, allow_other_base)
    if device is not None or dtype is not None:
        model = model.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    has_lora = config.get("lora") is not None
    if has_lora:
        _inject_lora(model, config["lora"], source)
    attach(model, method_config, eviction=eviction_config)
    try:
        _load_tensors(model, ckpt.tensors, has_lora, source)
    except Exception:
        detach(model)
        raise
    model.trainkv_checkpoint = {"source": source, "path": str(directory), "config": config}
    return model.eval()


def attach_with_base(model: nn.Module, method, eviction: EvictionConfig | dict | None = None, **method_overrides):
    """`trainkv.attach`, plus the trained scorer a ``layer_budget`` method names as ``base_checkpoint``: its settings
    merged into the method's (`trainkv.hub.bases.resolve_base`) before attaching, its weights loaded after. For any
    other method, the same as `trainkv.attach`. (A trained ``layer_budget`` checkpoint holds its base's weights:
    `load_gated` needs no base checkpoint.)"""
    attach(model, resolve_base(make_config(method, **method_overrides)), eviction)
    try:
        load_base_weights(model)
    except Exception:
        detach(model)
        raise
    return model


__all__ = ["attach_with_base", "check_base", "checkpoint_method_config", "load_base_model", "load_gated"]
