"""The gate checkpoint format: what a checkpoint directory holds and how it is checked.

A checkpoint is a directory (or a Hub model repo) with three files:

- ``model.safetensors``: only the method's tensors, keyed as `trainkv.method_state_dict` keys them
  (``layers.{i}.{name}``), plus LoRA tensors under ``lora.`` when the model carries peft LoRA layers;
- ``config.json``: `format_version`, `trainkv_version`, the base model (`base_model`, `base_revision`,
  `base_config_hash`, `base_shape`), the method (`MethodConfig.to_dict()`), the eviction settings
  (`EvictionConfig.to_dict()`), optionally `lora` (the peft `LoraConfig`), and `weights_sha256`;
- ``README.md``: the Hub model card (``library_name: trainkv``, ``base_model``, ``base_model_relation: adapter``).

Reading never executes code from the checkpoint: weights are only read with safetensors, and pickle
files (``pytorch_model.bin``, ``*.pt``, ``*.pkl``, ...) are refused without being opened.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
LORA_PREFIX = "lora."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SHAPE_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size",
)
REQUIRED_KEYS = ("format_version", "base_model", "base_shape", "method", "eviction")


class CheckpointError(ValueError):
    """A checkpoint that trainkv refuses to load (wrong base model, corrupted, unknown method, ...)."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint (or one of its files, or its base model) that cannot be found, locally or on the Hub."""


def base_shape(model_or_config) -> dict:
    """The architecture fields of a base model that a checkpoint depends on."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {
        "model_type": getattr(text, "model_type", None),
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "vocab_size": text.vocab_size,
    }


def config_hash(shape: dict) -> str:
    """sha256 of the architecture fields, as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps({k: shape.get(k) for k in SHAPE_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def base_model_name(model) -> str:
    """The Hub id (or path) of a model's base: ``config.trainkv_base_model`` if set, else ``_name_or_path``."""
    config = model.config
    return getattr(config, "trainkv_base_model", None) or getattr(config, "_name_or_path", None) or ""


def base_revision(model) -> str | None:
    config = model.config
    return getattr(config, "trainkv_base_revision", None) or getattr(config, "_commit_hash", None)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pickle_files(directory: Path) -> list[str]:
    """Names of files in ``directory`` that would have to be unpickled to be read. They are never opened."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def check_files(directory: Path) -> None:
    """Refuse a directory that lacks ``config.json`` or ``model.safetensors`` (naming any pickle files found)."""
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: no such checkpoint directory")
    pickles = pickle_files(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        if pickles:
            raise CheckpointError(
                f"{directory}: no {WEIGHTS_NAME}, only pickle weight file(s) {', '.join(pickles)}. trainkv loads "
                "weights only from safetensors and never unpickles files (unpickling can run arbitrary code); "
                "re-save the checkpoint with trainkv.save_gated"
            )
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
        raise CheckpointNotFoundError(
            f"{directory}: missing {' and '.join(missing)}; a trainkv checkpoint holds {CONFIG_NAME}, {WEIGHTS_NAME} "
            f"and {CARD_NAME} (written by trainkv.save_gated)"
        )
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointNotFoundError(
            f"{directory}: missing {CONFIG_NAME} (it names the base model, the method and its settings); "
            "re-save the checkpoint with trainkv.save_gated"
        )


def read_config(directory: Path) -> dict:
    """Read and check ``config.json``: valid JSON, a trainkv checkpoint, a format this version reads."""
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is corrupted") from e
    if not isinstance(config, dict) or "format_version" not in config:
        raise CheckpointError(
            f"{path}: no format_version; this is not a trainkv gate checkpoint (a plain transformers or peft "
            "model directory?). trainkv checkpoints are written by trainkv.save_gated"
        )
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version} is newer than this trainkv {__version__} reads "
            f"(up to {FORMAT_VERSION}); it was written by trainkv {config.get('trainkv_version', '?')}. "
            f"{UPGRADE[0].upper()}{UPGRADE[1:]}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}; the checkpoint is incomplete or corrupted")
    if not isinstance(config["method"], dict) or "method" not in config["method"]:
        raise CheckpointError(f"{path}: field 'method' must be a method config with a 'method' name")
    shape = config["base_shape"]
    if not isinstance(shape, dict) or set(shape) != set(SHAPE_FIELDS):
        raise CheckpointError(f"{path}: base_shape must have the fields {list(SHAPE_FIELDS)}")
    stored_hash = config.get("base_config_hash")
    if stored_hash is not None and stored_hash != config_hash(shape):
        raise CheckpointError(
            f"{path}: base_config_hash does not match base_shape; config.json was edited or corrupted"
        )
    return config


#: How to get a newer trainkv (it is not on PyPI: the name there is not this project's).
UPGRADE = "upgrade trainkv (in your checkout: `git pull && pip install -e .`; from a wheel: install the newer wheel)"

#: How pickle files begin: protocol 2-5 (``\\x80`` + protocol byte) or ``torch.save``'s zip archive.
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def read_weights(directory: Path, config: dict) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (safetensors only), refusing pickles (unopened), corrupted or truncated files."""
    path = directory / WEIGHTS_NAME
    size = path.stat().st_size
    header_len = None
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PICKLE_MAGIC):
        raise CheckpointError(
            f"{path}: this is a pickle (torch.save) file named {WEIGHTS_NAME}, not safetensors; trainkv never unpickles "
            "(it can run code). Re-save the tensors with safetensors.torch.save_file, or with trainkv.save_gated"
        )
    if size >= 8:
        header_len = int.from_bytes(head, "little")
    if header_len is None or header_len > size - 8:
        raise CheckpointError(
            f"{path}: corrupted or truncated safetensors file ({size} bytes, header claims {header_len} bytes); "
            "re-download or re-save the checkpoint"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: corrupted or truncated safetensors file ({e}); re-download or re-save the checkpoint"
        ) from e
    expected = config.get("weights_sha256")
    if expected is not None:
        actual = file_sha256(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: corrupted weights: sha256 {actual} does not match weights_sha256 {expected} in "
                f"{CONFIG_NAME}; re-download or re-save the checkpoint"
            )
    return tensors


def shape_mismatch(saved: dict, actual: dict) -> list[str]:
    """``field: saved vs actual`` for each architecture field that differs."""
    return [f"{k}: {saved.get(k)!r} vs {actual.get(k)!r}" for k in SHAPE_FIELDS if saved.get(k) != actual.get(k)]


def to_jsonable(value):
    """Sets to sorted lists, enums to their values, recursively (for peft configs)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
