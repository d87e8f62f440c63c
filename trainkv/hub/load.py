"""`load_gated`: find a gate checkpoint (alias, local path or Hub repo), load its base model, attach, load weights.

Where a name is looked up, in order:

1. an alias of `trainkv.ALIASES` (``smollm2-135m``, ``llama3.1-8b``, ...): the directory
   ``checkpoints/<alias>/`` under the first checkpoint root that has it. Roots, in order: each entry
   of ``$TRAINKV_CHECKPOINTS`` (``os.pathsep``-separated), ``./checkpoints`` (the current directory),
   and the ``checkpoints/`` folder of the trainkv source tree. Inside ``checkpoints/<alias>/``: the
   directory itself if it holds ``config.json``; else the subfolder named in its ``DEFAULT`` text file;
   else its single subfolder holding a ``config.json`` (several and no ``DEFAULT``: an error listing
   them). Not found locally: the Hub repo ``ALIASES[alias].gates_repo``.
   ``<alias>/<name>`` (e.g. ``smollm2-135m/attention_gate``) names ``checkpoints/<alias>/<name>/``.
2. an existing local directory;
3. a Hub repo id (``org/name``): downloaded with `huggingface_hub.snapshot_download` (only
   ``config.json``, ``model.safetensors``, ``README.md``) into the Hugging Face cache. With
   ``HF_HUB_OFFLINE=1`` only the cache is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..config import EvictionConfig
from ..models import ALIASES
from .checkpoint import GateCheckpoint, is_repo_id
from .format import (
    CHECKPOINT_FILES, CONFIG_NAME, LORA_PREFIX, WEIGHTS_NAME, CheckpointError, CheckpointNotFoundError,
    base_model_name, base_shape, shape_mismatch,
)

ENV_ROOTS = "TRAINKV_CHECKPOINTS"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    return env.strip().lower() in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def checkpoint_roots() -> list[Path]:
    """Folders searched for ``<alias>/`` checkpoints, in order (existing or not)."""
    roots = [Path(p).expanduser() for p in os.environ.get(ENV_ROOTS, "").split(os.pathsep) if p]
    roots.append(Path.cwd() / "checkpoints")
    roots.append(Path(__file__).resolve().parents[2] / "checkpoints")  # source checkout
    seen, out = set(), []
    for root in roots:
        key = root.resolve()
        if key not in seen:
            seen.add(key)
            out.append(root)
    return out


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def pick_default(alias_dir: Path) -> Path | None:
    """The checkpoint an ``checkpoints/<alias>/`` folder stands for (see the module doc), or None if it holds none."""
    if _is_checkpoint(alias_dir):
        return alias_dir
    default = alias_dir / "DEFAULT"
    if default.is_file():
        name = default.read_text().strip()
        target = alias_dir / name
        if not name or not target.is_dir():
            raise CheckpointNotFoundError(f"{default} names {name!r}, which is not a folder of {alias_dir}")
        return target
    subs = sorted(p for p in alias_dir.iterdir() if _is_checkpoint(p))
    if len(subs) > 1:
        names = ", ".join(p.name for p in subs)
        raise CheckpointError(
            f"{alias_dir} holds several checkpoints ({names}) and no DEFAULT file: write the one to use into "
            f"{default}, or pass its path (e.g. {subs[0]})"
        )
    return subs[0] if subs else None


def find_local_checkpoint(name: str) -> Path | None:
    """``checkpoints/<alias>[/<sub>]`` for an alias (or ``alias/sub``) under the checkpoint roots, or None."""
    alias, _, sub = name.partition("/")
    if alias not in ALIASES:
        return None
    for root in checkpoint_roots():
        alias_dir = root / alias
        if not alias_dir.is_dir():
            continue
        if sub:
            if (alias_dir / sub).is_dir():
                return alias_dir / sub
            continue
        found = pick_default(alias_dir)
        if found is not None:
            return found
    return None


def download_checkpoint(repo_id: str, *, revision: str | None = None, token=None, endpoint: str | None = None,
                        cache_dir=None, local_files_only: bool = False, force_download: bool = False) -> Path:
    """Download (or find in the HF cache) the checkpoint files of a Hub repo; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    offline = local_files_only or hub_offline()
    at = f" (revision {revision})" if revision else ""
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(CHECKPOINT_FILES), token=token, endpoint=endpoint,
            cache_dir=cache_dir, local_files_only=offline, force_download=force_download,
        )
    except RevisionNotFoundError as e:
        raise CheckpointNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise CheckpointNotFoundError(
            f"Hub repo {repo_id} not found (or private: log in with `hf auth login` or pass token=)"
        ) from e
    except LocalEntryNotFoundError as e:
        if offline:
            raise CheckpointNotFoundError(
                f"gate checkpoint {repo_id}{at} is not in the local Hugging Face cache and the Hub is offline "
                f"(HF_HUB_OFFLINE=1). Missing: {', '.join(CHECKPOINT_FILES)}. Get them while online with "
                f"`hf download {repo_id} {' '.join(CHECKPOINT_FILES)}` (or unset HF_HUB_OFFLINE), or put the "
                "checkpoint directory in checkpoints/<alias>/ and pass its path"
            ) from e
        raise CheckpointNotFoundError(
            f"could not download gate checkpoint {repo_id}{at} from {endpoint or 'the Hub'} and it is not cached "
            f"({e}). Check the connection, or download it elsewhere with `hf download {repo_id}` and pass the folder"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointNotFoundError(f"downloading gate checkpoint {repo_id}{at} failed: {e}") from e
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"Hub repo {repo_id}{at} has no {WEIGHTS_NAME}; trainkv loads gate weights only from safetensors "
            "and never downloads or unpickles pickle files (pytorch_model.bin, *.pt, *.pkl)"
        )
    return folder


def resolve_checkpoint(name: str | os.PathLike, *, revision: str | None = None, token=None,
                       endpoint: str | None = None, cache_dir=None, local_files_only: bool = False,
                       force_download: bool = False) -> Path:
    """The local directory of a checkpoint given as an alias, a local path or a Hub repo id (see the module doc)."""
    name = os.fspath(name)
    hub = dict(revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
               local_files_only=local_files_only, force_download=force_download)
    if name.partition("/")[0] in ALIASES:
        local = find_local_checkpoint(name)
        if local is not None:
            return local
        if name in ALIASES:
            repo = ALIASES[name].gates_repo
            if repo is None:
                searched = ", ".join(str(r / name) for r in checkpoint_roots())
                raise CheckpointNotFoundError(
                    f"no gate checkpoint for {name!r}: none in {searched}, and ALIASES[{name!r}].gates_repo names "
                    "no Hub repo. Train one (recipes/ write to checkpoints/<alias>/<method>/), or pass a "
                    "checkpoint path or Hub repo id"
                )
            return download_checkpoint(repo, **hub)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.name in CHECKPOINT_FILES:
            return path.parent
        if not path.is_dir():
            raise CheckpointNotFoundError(f"{path}: a checkpoint is a directory holding {', '.join(CHECKPOINT_FILES)}")
        return path
    if is_repo_id(name) and not name.startswith((".", "~")):
        return download_checkpoint(name, **hub)
    raise CheckpointNotFoundError(
        f"{name!r}: no such checkpoint directory, and not a model alias ({', '.join(ALIASES)}) or a Hub repo id"
    )


def _alias_for(base: str) -> str | None:
    if base in ALIASES:
        return base
    for alias, entry in ALIASES.items():
        if entry.hub_repo == base:
            return alias
    return None


def load_base_model(config: dict, name: str, device=None, dtype=None) -> nn.Module:
    """Load the base model a checkpoint names, with `trainkv.load_model` (offline copies of aliases first)."""
    from ..models import load_model

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


def check_base(model: nn.Module, config: dict, source: str) -> None:
    """Refuse a model whose architecture differs from the checkpoint's base model, naming both and the fields."""
    saved = config["base_shape"]
    actual = base_shape(model)
    diff = shape_mismatch(saved, actual)
    name = base_model_name(model)
    if not diff and name and name != config["base_model"]:
        warnings.warn(
            f"gate checkpoint {source} was trained for base model {config['base_model']!r}; the model is {name!r}. "
            "Same architecture, so it loads, but gates trained on other weights may evict poorly",
            stacklevel=3,
        )
    if diff:
        raise CheckpointError(
            f"gate checkpoint {source} was trained for base model {config['base_model']!r}, but the model is "
            f"{name or type(model).__name__!r}, a different architecture "
            f"(checkpoint vs model: {'; '.join(diff)}). Load the checkpoint's base model, or use gates trained for "
            "this model"
        )


def _eviction_config(config: dict, eviction, overrides: dict, source: str) -> EvictionConfig:
    try:
        saved = EvictionConfig.from_dict(config["eviction"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"gate checkpoint {source}: its eviction settings do not load ({e}); it was written by trainkv "
            f"{config.get('trainkv_version', '?')}: upgrade trainkv"
        ) from e
    if isinstance(eviction, EvictionConfig):
        saved = eviction
    elif isinstance(eviction, dict):
        saved = saved.replace(**eviction)
    elif eviction is not None:
        raise TypeError(f"eviction must be an EvictionConfig or a dict, got {type(eviction).__name__}")
    return saved.replace(**overrides) if overrides else saved


def checkpoint_method_config(config: dict, source: str):
    from ..methods import METHODS, make_config

    name = config["method"]["method"]
    if name not in METHODS:
        raise CheckpointError(
            f"gate checkpoint {source} uses method {name!r}, which this trainkv does not know (known: "
            f"{', '.join(sorted(METHODS))}). It was written by trainkv {config.get('trainkv_version', '?')}: "
            "upgrade trainkv, or import the module that registers the method first"
        )
    try:
        return make_config(config["method"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"gate checkpoint {source}: settings of method {name!r} do not load: {e}") from e


def _inject_lora(model: nn.Module, lora_config: dict, source: str) -> None:
    try:
        from peft import PeftConfig, inject_adapter_in_model
    except ImportError as e:
        raise CheckpointError(f"gate checkpoint {source} has LoRA weights; install peft to load them") from e
    inject_adapter_in_model(PeftConfig.from_peft_type(**lora_config), model)


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], has_lora: bool, source: str) -> None:
    """Load method (and LoRA) tensors strictly: same keys, same shapes."""
    from ..attach import method_modules, method_state_dict

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
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

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
               endpoint: str | None = None, cache_dir=None, **eviction_overrides) -> nn.Module:
    """Load a base model with trained eviction gates attached; its ``generate`` evicts.

    ``name``: a model alias (``checkpoints/<alias>/`` first, then the alias's Hub gates repo), a local
    checkpoint directory, or a Hub repo id (see `trainkv.hub.load`). ``model``: use this base model
    instead of loading the checkpoint's (its architecture must match). ``eviction`` (an
    `EvictionConfig`, replacing the checkpoint's settings, or a dict of overrides) and
    ``eviction_overrides`` (e.g. ``budget=128``) change the settings the checkpoint was trained with;
    ``generate(..., eviction={...})`` changes them per call. ``revision``, ``token``, ``endpoint`` and
    ``cache_dir`` go to huggingface_hub for Hub repos.
    """
    from ..attach import attach, detach

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
    check_base(model, config, source)
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
