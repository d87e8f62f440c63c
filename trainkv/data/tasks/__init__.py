"""Registry of the seeded RULER-style synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654).

Every entry of :data:`TASKS` is a callable
``gen(tokenizer, *, context_tokens, seed=0, split="eval", index=0, depth=None) -> Sample``.
A sample is a pure function of ``(task, split, seed, index)`` and the tokenizer; ``split="train"``
and ``split="eval"`` use disjoint prompt templates, key vocabularies / word lists, noise blocks and
prose chapters, and the split is mixed into the seed (see ``_base.py`` and ``haystack.py``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from trainkv.data.sample import Sample
from trainkv.data.tasks import common_words, frequent_words, kv_retrieval, niah, passkey, variable_tracking

TaskFn = Callable[..., Sample]

TASKS: dict[str, TaskFn] = {
    **{name: partial(niah.generate, task=name, config=cfg) for name, cfg in niah.VARIANTS.items()},
    "vt": variable_tracking.generate,
    "cwe": common_words.generate,
    "fwe": frequent_words.generate,
    "kv_retrieval": kv_retrieval.generate,
    "passkey": passkey.generate,
}

#: RULER's 11 synthetic tasks that need no download (its qa_1/qa_2 need SQuAD/HotpotQA).
RULER_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)

#: The template table of each task (``{"train": (...), "eval": (...)}``), e.g. for leakage checks.
TEMPLATES = {
    **{name: niah.TEMPLATES for name in niah.VARIANTS},
    "vt": variable_tracking.TEMPLATES,
    "cwe": common_words.TEMPLATES,
    "fwe": frequent_words.TEMPLATES,
    "kv_retrieval": kv_retrieval.TEMPLATES,
    "passkey": passkey.TEMPLATES,
}


#: Task families: tasks that test the same skill with the same prompt templates. A held-out-family experiment trains
#: on every other family and evaluates this one (``trainkv eval --tasks family:<name>``, see docs/protocol.md).
#: The two needle families share one template table (`niah.TEMPLATES`), so neither can be held out alone
#: (`training_tasks_without` refuses); every other family has templates, vocabularies and needle formats of its own.
TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "niah_single": ("niah_single_1", "niah_single_2", "niah_single_3", "niah_single_words"),
    "niah_multi": ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"),
    "variable_tracking": ("vt",),
    "aggregation": ("cwe", "fwe"),
    "kv_retrieval": ("kv_retrieval",),
    "passkey": ("passkey",),
}


#: The family the held-out-family recipes leave out (``configs/recipes/*/*_heldout.yaml``; docs/protocol.md says why:
#: the retrieval families vt and kv_retrieval score 0 with SmolLM2's full cache, passkey is niah_single_1's structure
#: in other words, and the two needle families share one template table; aggregation has formats and a skill of its
#: own and a full-cache score to keep a share of).
HELD_OUT_FAMILY = "aggregation"


def family_tasks(family: str) -> tuple[str, ...]:
    try:
        return TASK_FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown task family {family!r}; known: {', '.join(sorted(TASK_FAMILIES))}") from None


def training_tasks_without(family: str) -> list[str]:
    """Every registered task outside ``family`` (the ``data.tasks`` of a held-out-family recipe).

    Refused when a remaining task shares a template table with the held-out family (its training samples would
    carry the held-out family's wording).
    """
    held = family_tasks(family)
    rest = [t for t in TASKS if t not in held]
    shared = sorted({t for t in rest for h in held if TEMPLATES[t] is TEMPLATES[h]})
    if shared:
        raise ValueError(f"family {family!r} shares its prompt templates with {', '.join(shared)}; hold out the "
                         "tasks that share a template table together")
    return rest


def get_task(name: str) -> TaskFn:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def generate_sample(
    task: str, tokenizer: Any, context_tokens: int, seed: int = 0, split: str = "eval", index: int = 0,
    depth: float | None = None, **kwargs: Any,
) -> Sample:
    """Sample ``index`` of ``(task, seed, split)`` (the same one :func:`generate_samples` returns)."""
    return get_task(task)(tokenizer, context_tokens=context_tokens, seed=seed, split=split, index=index,
                          depth=depth, **kwargs)


def generate_samples(
    task: str, tokenizer: Any, n: int, context_tokens: int, seed: int = 0, split: str = "eval",
    depth: float | None = None, **kwargs: Any,
) -> list[Sample]:
    """``n`` samples of ``task`` sized to ``context_tokens`` with ``tokenizer``.

    Needle depths are drawn uniformly per sample unless ``depth`` (in [0, 1]) fixes them; extra
    keyword arguments go to the task's generator (e.g. ``num_chains`` for ``vt``).
    """
    return [generate_sample(task, tokenizer, context_tokens, seed, split, i, depth, **kwargs) for i in range(n)]


__all__ = ["HELD_OUT_FAMILY", "TASKS", "RULER_TASKS", "TASK_FAMILIES", "TEMPLATES", "family_tasks", "get_task", "generate_sample",
           "generate_samples", "training_tasks_without"]
