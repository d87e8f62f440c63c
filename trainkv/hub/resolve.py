"""Name resolution of gate checkpoints: an alias, a local path or a Hub repo id -> a local directory.

Where a name is looked up, in order:

1. an alias of `trainkv.ALIASES` (``smollm2-135m``, ``llama3.1-8b``, ...): the directory
   ``checkpoints/<alias>/`` under the first checkpoint root that has it. Roots, in order: each entry
   of ``$TRAINKV_CHECKPOINTS`` (``os.pathsep``-separated), ``./checkpoints`` (the current directory),
   the ``checkpoints/`` folder of the trainkv source tree, and that of an installed wheel
   (``<prefix>/share/trainkv/checkpoints``, `trainkv.resources`). Inside ``checkpoints/<alias>/``: the
   directory itself if it holds ``config.json``; else the subfolder named in its ``DEFAULT`` text file;
   else its single subfolder holding a ``config.json`` (several and no ``DEFAULT``: an error listing
   them). Not found locally: the Hub repo ``ALIASES[alias].gates_repo``.
   ``<alias>/<name>`` (e.g. ``smollm2-135m/attention_gate``) names ``checkpoints/<alias>/<name>/``; one that
   is not there is an error listing the checkpoints that are (never a Hub lookup: the alias is local).
2. an existing local directory;
3. a Hub repo id (``org/name``): downloaded with `huggingface_hub.snapshot_download` (only
   ``config.json``, ``model.safetensors``, ``README.md``) into the Hugging Face cache. With
   ``HF_HUB_OFFLINE=1`` only the cache is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from ..models import ALIASES, hub_offline
from ..resources import data_roots
from .format import CHECKPOINT_FILES, CONFIG_NAME, WEIGHTS_NAME, CheckpointError, CheckpointNotFoundError

ENV_ROOTS = "TRAINKV_CHECKPOINTS"
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID_RE.match(name)) and ".." not in name


def checkpoint_roots() -> list[Path]:
    """Folders searched for ``<alias>/`` checkpoints, in order (existing or not)."""
    roots = [Path(p).expanduser() for p in os.environ.get(ENV_ROOTS, "").split(os.pathsep) if p]
    roots.append(Path.cwd() / "checkpoints")
    roots += [root / "checkpoints" for root in data_roots()]  # the source checkout, then a wheel's data files
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


def local_listing(alias: str) -> str:
    """What ``checkpoints/<alias>/`` holds under every root, as one sentence."""
    found = sorted({f"{alias}/{p.name}" for root in checkpoint_roots() if (root / alias).is_dir()
                    for p in (root / alias).iterdir() if _is_checkpoint(p)})
    searched = ", ".join(str(r / alias) for r in checkpoint_roots())
    return f"local checkpoints of {alias}: {', '.join(found)}" if found else f"none under {searched}"


def download_checkpoint(repo_id: str, *, revision: str | None = None, token=None, endpoint: str | None = None,
                        cache_dir=None, local_files_only: bool = False, force_download: bool = False) -> Path:
    """Download (or find in the HF cache) the checkpoint files of a Hub repo; returns the snapshot folder."""
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
                    "no Hub repo. Train one (a recipe writes runs/<alias>/<recipe>/final; scripts/ship_checkpoint.py "
                    "copies it into checkpoints/<alias>/<method>/), or pass a checkpoint path or Hub repo id"
                )
            return download_checkpoint(repo, **hub)
        if not Path(name).expanduser().exists():
            raise CheckpointNotFoundError(f"no checkpoint {name!r}; {local_listing(name.partition('/')[0])}")
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


__all__ = ["ENV_ROOTS", "checkpoint_roots", "download_checkpoint", "find_local_checkpoint", "is_repo_id", "pick_default",
           "resolve_checkpoint"]
