"""Shared pieces of the task generators: seeding, prompt templates and sample assembly.

Seeding: a sample is a pure function of ``(task, split, seed, index)``. Its RNG is
``random.Random("trainkv|<task>|<split>|<seed>|<index>")`` (string seeds are hashed with SHA-512,
stable across processes and Python versions), so the same seed number gives unrelated samples in
the two splits and in two tasks, and the global RNG is never touched.

Templates: every task keeps a tuple of :class:`PromptTemplate` per split. EVAL holds the wording of
RULER (Hsieh et al. 2024, arXiv 2404.06654) or InfiniteBench; TRAIN holds paraphrases that share no
literal fragment with it, so a trained method never sees the evaluation prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from trainkv.data.haystack import check_split
from trainkv.data.sample import Sample
from trainkv.data.sizing import count_tokens, fit_units, tolerance

GENERATOR_VERSION = "trainkv-ruler-1"


def make_rng(task: str, split: str, seed: int, index: int = 0) -> random.Random:
    """The RNG of one sample; mixes the task, the split, the seed and the sample index."""
    check_split(split)
    return random.Random(f"trainkv|{task}|{split}|{int(seed)}|{int(index)}")


@dataclass(frozen=True)
class PromptTemplate:
    """The wording of a task: instruction before the haystack, needle, question and answer prefix.

    Fields are ``str.format`` templates; the placeholders depend on the task.
    """

    intro: str
    question: str
    answer_prefix: str
    needle: str = ""
    extra: tuple[str, ...] = ()  # further needle forms (e.g. variable tracking's copy line)

    def fields(self) -> tuple[str, ...]:
        return (self.intro, self.question, self.answer_prefix, self.needle, *self.extra)

    def fragments(self, min_len: int = 12) -> list[str]:
        """The literal pieces (between placeholders) of at least ``min_len`` characters."""
        out = []
        for f in self.fields():
            for piece in re.split(r"\{[^{}]*\}", f):
                piece = piece.strip()
                if len(piece) >= min_len:
                    out.append(piece)
        return out


def pick_template(
    templates: dict[str, tuple[PromptTemplate, ...]], split: str, rng: random.Random
) -> tuple[int, PromptTemplate]:
    """A template of the split chosen with ``rng`` (EVAL usually has exactly one)."""
    options = templates[check_split(split)]
    i = rng.randrange(len(options))
    return i, options[i]


def sample_depths(rng: random.Random, n: int, depth: float | None) -> list[float]:
    """Depths of ``n`` needles: the first at ``depth`` if given, the others uniform in [0, 1]."""
    depths = [rng.random() for _ in range(n)]
    if depth is not None:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        depths[0] = float(depth)
    return depths


def join_context(intro: str, body: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """``intro + "\\n" + body`` with the body's spans shifted accordingly."""
    shift = len(intro) + 1
    return f"{intro}\n{body}", [(a + shift, b + shift) for a, b in spans]


def fit_context(
    tokenizer: Any,
    build: Callable[[int], tuple[str, list[tuple[int, int]]]],
    target: int,
    *,
    unit_tokens: int = 0,
    task: str,
    lo: int = 1,
    hi: int | None = None,
) -> tuple[str, list[tuple[int, int]], int, int]:
    """Size ``build(n) -> (context, spans)`` to ``target`` tokens.

    Returns ``(context, spans, measured_tokens, tolerance)``; raises ``ValueError`` when no unit count
    lands within the tolerance (e.g. a target too small for the instruction and needles).
    """
    tol = tolerance(target, unit_tokens)
    n, (context, spans), got = fit_units(
        build, lambda built: count_tokens(tokenizer, built[0]), target, tol=tol, lo=lo, hi=hi
    )
    if abs(got - target) > tol:
        raise ValueError(f"{task}: cannot size the context to {target}±{tol} tokens (closest: {got} with {n} units)")
    return context, spans, got, tol


def check_occurrences(context: str, strings: list[str], expected: int) -> bool:
    """True when every string occurs exactly ``expected`` times in ``context``."""
    return all(context.count(s) == expected for s in strings)


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def make_sample(
    *,
    tokenizer: Any,
    task: str,
    split: str,
    seed: int,
    index: int,
    template_id: int,
    context: str,
    question: str,
    answer_prefix: str,
    answers: list[str],
    max_new_tokens: int,
    context_tokens: int,
    target_tokens: int,
    tol: int,
    needle_spans: list[tuple[int, int]],
    metric: str = "all",
    **metadata: Any,
) -> Sample:
    """Assemble a :class:`Sample` with the common metadata."""
    meta = {
        "index": index,
        "target_tokens": target_tokens,
        "tolerance": tol,
        "template": f"{split}/{template_id}",
        "tokenizer": tokenizer_name(tokenizer),
        "generator": GENERATOR_VERSION,
        **metadata,
    }
    return Sample(
        context=context,
        question=question,
        answer_prefix=answer_prefix,
        answers=list(answers),
        max_new_tokens=max_new_tokens,
        task=task,
        metric=metric,
        context_tokens=context_tokens,
        seed=seed,
        split=split,
        needle_spans=needle_spans,
        metadata=meta,
    )
