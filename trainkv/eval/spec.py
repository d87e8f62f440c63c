"""What one evaluation cell is: the method row, the keep (budget) column, the protected tokens, the task list.

Shared by the task sweep (`trainkv.eval.runner`), the KL / perplexity runs (`trainkv.eval.quality`) and the
allocation comparison (`trainkv.eval.allocation`).

Keep. ``trainkv eval --keep`` takes the budget language of `trainkv.budgets` with one evaluation-specific meaning
of a ratio: ``0.125`` / ``1/8`` is a share of the run's *nominal context length*, fixed as
``round(r * context_length)`` entries per (layer, KV head) for every sample of the run (one budget per run, so
samples can share a batch); ``512`` is 512 entries. (At run time a ratio budget is a share of the tokens seen so
far, which grows: hence the other name.)

Protected tokens, the same for every method: ``sink_tokens = 4`` first tokens and a recent window of
``min(32, entries // 4)`` tokens (``--sink-tokens`` / ``--recent-window`` override both; a checkpoint's method
may ask for its own window, `MethodConfig.protected_recent`).

Splits (docs/protocol.md). Every evaluation sample comes from the generators' ``eval`` split; which *seeds* it is
drawn with says what the numbers may be used for:

* ``dev`` (seeds :data:`DEV_SEEDS`): every choice (checkpoint, hyper-parameters, run-time settings) is made on these;
* ``test`` (seed :data:`TEST_SEED`): reported numbers only, after the choice is recorded (``selection.json``);
* ``adhoc``: any other ``--seed`` (default :data:`DEFAULT_SEED`, the seed of the pre-protocol results): exploration,
  neither a choice nor a reported number may rest on it. A run drawn with a test seed is a test run, however it
  was started.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from trainkv.budgets import keep_entries, parse_budget
from trainkv.data.tasks import RULER_TASKS, TASK_FAMILIES, TASKS, family_tasks
from trainkv.hub.format import file_sha256
from trainkv.methods import get_method

#: Default seed of ad-hoc evaluations (the seed of every result before the dev/test protocol; it steered choices, so
#: it is neither dev nor test). Training draws from ``split="train"`` (other templates, vocabularies and haystacks).
DEFAULT_SEED = 1234
#: Seeds of the dev split: 4321 and 777 were the Locret search's dev sets; 2024 was a one-off confirmation set whose
#: numbers have been read (so it can no longer be test). A dev cell pools ``--samples`` per task from each seed.
DEV_SEEDS: tuple[int, ...] = (4321, 777, 2024)
#: Seed of the test split: drawn by no run file before the protocol (docs/protocol.md: "Seeds").
TEST_SEED = 271828
#: The day the test seed was declared: a test-seed run file dated earlier would mean it was drawn before (checked by
#: tests/test_protocol.py).
TEST_SEED_DECLARED = "2026-12-02"
SPLIT_SEEDS: dict[str, tuple[int, ...]] = {"dev": DEV_SEEDS, "test": (TEST_SEED,)}
ADHOC = "adhoc"
EVAL_SPLITS = ("dev", "test", ADHOC)
SPLIT = "eval"  # the generators' split of every evaluation sample (``split`` in run files)
FULL = "full"
DEFAULT_SINK_TOKENS = 4
MAX_RECENT_WINDOW = 32
NO_EVICTION_BUDGET = 2**31 - 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# keep (the budget column) and protected tokens
# ---------------------------------------------------------------------------------------------------------
def parse_keep(value: str | int | float) -> int | float:
    """An evaluation keep: ``"1/8"`` / ``"0.125"`` -> ratio of the context, ``"64"`` -> 64 entries (`trainkv.budgets`)."""
    return parse_budget(value, what="--keep")


def keep_ratio(budget: int | float, context_length: int) -> float:
    """The keep ratio a budget stands for at ``context_length`` (x axis of the plots)."""
    return float(budget) if isinstance(budget, float) else budget / context_length


def budget_label(budget: int | float | None) -> str:
    """Stable text for file names and table columns: ``r0.125`` (ratio), ``n64`` (entries), ``full``."""
    if budget is None:
        return FULL
    if isinstance(budget, float):
        return f"r{budget:g}"
    return f"n{int(budget)}"


def protected_tokens(budget: int, sink_tokens: int | None = None, recent_window: int | None = None) -> tuple[int, int]:
    """``(sink_tokens, recent_window)`` for a budget: 4 sinks and ``min(32, budget // 4)`` recent tokens.

    Explicit values win. Sinks shrink (and the window to 0) when the budget cannot hold them.
    """
    sink = DEFAULT_SINK_TOKENS if sink_tokens is None else int(sink_tokens)
    recent = min(MAX_RECENT_WINDOW, budget // 4) if recent_window is None else int(recent_window)
    sink = min(sink, budget)
    recent = max(0, min(recent, budget - sink))
    return sink, recent


def eviction_settings(
    budget: int, chunk_size: int | None, sink_tokens: int | None = None, recent_window: int | None = None,
) -> dict[str, Any]:
    """The ``EvictionConfig`` fields a run uses (passed as overrides to ``model.new_cache``)."""
    sink, recent = protected_tokens(budget, sink_tokens, recent_window)
    return {
        "budget": int(budget), "sink_tokens": sink, "recent_window": recent,
        "chunk_size": int(chunk_size) if chunk_size else NO_EVICTION_BUDGET,
    }


# ---------------------------------------------------------------------------------------------------------
# splits: dev / test / adhoc
# ---------------------------------------------------------------------------------------------------------
def resolve_split(split: str | None = None, seed: int | None = None) -> tuple[str, tuple[int, ...]]:
    """``(eval split, seeds)`` of an evaluation: ``--split dev|test`` or an ad-hoc ``--seed`` (default 1234).

    A ``--seed`` that is the test seed makes a test run (it is one); a dev seed alone is still ad hoc (a dev cell
    pools every dev seed).
    """
    if split is not None:
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_SEEDS)} (or give --seed for an ad-hoc run), "
                             f"got {split!r}")
        if seed is not None and seed not in SPLIT_SEEDS[split]:
            raise ValueError(f"--split {split} draws seeds {list(SPLIT_SEEDS[split])}; --seed {seed} is another "
                             "sample set (leave out --split for an ad-hoc run)")
        return split, SPLIT_SEEDS[split]
    seed = DEFAULT_SEED if seed is None else int(seed)
    return ("test" if seed in SPLIT_SEEDS["test"] else ADHOC), (seed,)


def run_seeds(record: dict[str, Any]) -> tuple[int, ...]:
    """The seeds a run file's samples were drawn with (its config, then its samples; old files: one ``seed``)."""
    cfg = record.get("config", record)
    seeds = cfg.get("seeds")
    if seeds is None:
        seed = cfg.get("seed", record.get("seed"))
        seeds = seed if isinstance(seed, list) else ([] if seed is None else [seed])
    found = {r.get("seed") for r in record.get("results", ()) if r.get("seed") is not None}
    return tuple(dict.fromkeys([*map(int, seeds), *sorted(found - set(seeds))]))


def record_split(record: dict[str, Any]) -> str:
    """``dev``, ``test`` or ``adhoc`` of a run file (task or KL run).

    Any sample drawn with a test seed makes it ``test``, whatever it says. Otherwise the recorded ``eval_split``;
    files written before the protocol have none and are ``adhoc`` (none of them drew the test seed).
    """
    cfg = record.get("config", record)
    seeds = set(run_seeds(record))
    if seeds & set(SPLIT_SEEDS["test"]):
        return "test"
    split = cfg.get("eval_split", record.get("eval_split"))
    if split == "dev" and not (seeds and seeds <= set(DEV_SEEDS)):
        return ADHOC  # says dev, drew other seeds
    return split if split in EVAL_SPLITS else ADHOC


# ---------------------------------------------------------------------------------------------------------
# methods and tasks
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One row of the sweep: ``full``, a training-free method (with optional settings) or a checkpoint.

    ``label`` is what tables and file names show: ``snapkv``, ``snapkv:window_size=64`` or the
    ``NAME`` of ``--checkpoint NAME=PATH``.
    """

    label: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "method": self.method, "overrides": dict(self.overrides), "checkpoint": self.checkpoint}
        if self.checkpoint is not None:
            # the weights, not the path, identify a trained method: a run made with other weights at the same
            # path must not count as done (resume) or be reported under these
            out["weights_sha256"] = checkpoint_digest(self.checkpoint)
        return out


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return file_sha256(Path(path))[:16]


def checkpoint_digest(checkpoint: str) -> str | None:
    """First 16 hex digits of the sha256 of a local checkpoint's ``model.safetensors`` (None for Hub ids / aliases)."""
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        return None
    st = weights.stat()
    return _file_digest(str(weights), st.st_size, st.st_mtime_ns, st.st_ino)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_settings(text: str, rest: str) -> tuple[tuple[str, Any], ...]:
    overrides = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method settings are KEY=VALUE, got {item!r} in {text!r}")
        overrides.append((key.strip(), _parse_value(value.strip())))
    return tuple(overrides)


def parse_method(text: str, checkpoints: dict[str, str] | None = None) -> MethodSpec:
    """``full`` | ``snapkv`` | ``snapkv:window_size=64,kernel_size=7`` | a ``--checkpoint`` name, optionally with
    run-time settings that replace the checkpoint's (``locret:pool_kernel=1,stabilizers=0.5``; same weights)."""
    checkpoints = checkpoints or {}
    if text in checkpoints:
        return MethodSpec(text, text, (), checkpoints[text])
    name, _, rest = text.partition(":")
    if name in checkpoints:
        return MethodSpec(text, name, _parse_settings(text, rest), checkpoints[name])
    if name == FULL:
        return MethodSpec(FULL, FULL)
    cls = get_method(name)  # raises on unknown names
    if cls.trainable:
        raise ValueError(f"{name} is trainable: give its weights with --checkpoint {name}=PATH")
    return MethodSpec(text, name, _parse_settings(text, rest))


def sanitize(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label).strip("-") or "method"


def expand_tasks(tasks: Iterable[str]) -> list[str]:
    """Task names; ``ruler`` stands for RULER's 11 offline tasks, ``all`` for every registered task,
    ``family:<name>`` for the tasks of a family (`trainkv.data.tasks.TASK_FAMILIES`)."""
    out: list[str] = []
    for t in tasks:
        if t == "ruler":
            out.extend(RULER_TASKS)
        elif t == "all":
            out.extend(TASKS)
        elif t.startswith("family:"):
            try:
                out.extend(family_tasks(t.partition(":")[2]))
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        elif t in TASKS:
            out.append(t)
        else:
            raise ValueError(f"unknown task {t!r}; known: ruler, all, family:<{'|'.join(TASK_FAMILIES)}>, "
                             f"{', '.join(sorted(TASKS))}")
    return list(dict.fromkeys(out))


__all__ = [
    "ADHOC", "DEFAULT_SEED", "DEV_SEEDS", "DTYPES", "EVAL_SPLITS", "FULL", "MethodSpec", "NO_EVICTION_BUDGET", "SPLIT",
    "SPLIT_SEEDS", "TEST_SEED", "TEST_SEED_DECLARED", "budget_label", "checkpoint_digest", "eviction_settings", "expand_tasks",
    "keep_entries", "keep_ratio", "parse_keep", "parse_method", "protected_tokens", "record_split", "resolve_split",
    "run_seeds", "sanitize",
]
