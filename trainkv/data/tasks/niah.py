"""Needle-in-a-haystack tasks of RULER (Hsieh et al. 2024, arXiv 2404.06654, Sec. 3.1 "Retrieval").

One generator covers RULER's eight variants (and a word-valued single needle) through
:class:`NiahConfig`: the haystack (``noise``, ``prose`` or a haystack of distractor ``needles``), the
kind of keys and values (``numbers`` / ``words`` / ``uuids``), the number of keys (multi-key: extra
keys are distractors), of values per key (multi-value) and of queried keys (multi-query).

Every needle sits at its own depth (uniform in [0, 1] unless ``depth`` fixes the first queried one)
between sentences (prose), filler blocks (noise) or distractor lines (needles), and every needle and
every answer value occurs in the context exactly once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from trainkv.data.haystack import ProseStream, depth_to_slot, insert_needles, noise_block, noise_pieces
from trainkv.data.sample import Sample
from trainkv.data.sizing import count_tokens
from trainkv.data.tasks._base import (
    PromptTemplate,
    check_occurrences,
    fit_context,
    join_context,
    make_rng,
    make_sample,
    pick_template,
    sample_depths,
)
from trainkv.data.vocab import distinct_values

#: Placeholders: {kind}/{kinds} (label of the value type), {key}, {value}, {query}.
TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "eval": (  # RULER's wording
        PromptTemplate(
            intro="Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {kinds} afterwards.",
            needle="One of the special magic {kinds} for {key} is: {value}.",
            question="What are all the special magic {kinds} for {query} mentioned in the provided text?",
            answer_prefix="The special magic {kinds} for {query} mentioned in the provided text are",
        ),
    ),
    "train": (
        PromptTemplate(
            intro="Below is a long passage with a few secret {kinds} tucked inside it. Read it closely, because "
            "you will be asked to recall them at the end.",
            needle="Note that a secret {kind} linked to {key} is {value}.",
            question="Which secret {kinds} were linked to {query} in the passage?",
            answer_prefix="The secret {kinds} linked to {query} in the passage are",
        ),
        PromptTemplate(
            intro="Several hidden {kinds} appear somewhere in the document that follows. Keep track of them; "
            "a question about them comes next.",
            needle="Remember: the hidden {kind} for {key} is {value}.",
            question="Recall each hidden {kind} given for {query} in the document.",
            answer_prefix="The hidden {kinds} given for {query} in the document are",
        ),
        PromptTemplate(
            intro="Read the following record carefully. It contains reference {kinds} that you will need later.",
            needle="Reference {kind} for {key}: {value}.",
            question="According to the record, which reference {kinds} belong to {query}?",
            answer_prefix="According to the record, the reference {kinds} belonging to {query} are",
        ),
    ),
}

#: (singular, plural) label of each value kind per split.
KIND_LABELS = {
    "eval": {"numbers": ("number", "numbers"), "words": ("word", "words"), "uuids": ("uuid", "uuids")},
    "train": {
        "numbers": ("code", "codes"),
        "words": ("passphrase", "passphrases"),
        "uuids": ("identifier", "identifiers"),
    },
}


@dataclass(frozen=True)
class NiahConfig:
    """One needle-in-a-haystack variant (RULER's ``synthetic.yaml`` knobs)."""

    haystack: str = "noise"  # "noise" | "prose" | "needles"
    key_kind: str = "words"  # "words" | "uuids" | "numbers"
    value_kind: str = "numbers"  # "numbers" | "words" | "uuids"
    num_keys: int = 1  # needles with distinct keys; keys beyond num_queries are distractors
    num_values: int = 1  # values per key (multi-value)
    num_queries: int = 1  # keys asked about (multi-query)
    max_new_tokens: int = 128


VARIANTS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig(haystack="noise"),
    "niah_single_2": NiahConfig(haystack="prose"),
    "niah_single_3": NiahConfig(haystack="prose", value_kind="uuids"),
    "niah_single_words": NiahConfig(haystack="prose", value_kind="words"),
    "niah_multikey_1": NiahConfig(haystack="prose", num_keys=4),
    "niah_multikey_2": NiahConfig(haystack="needles"),
    "niah_multikey_3": NiahConfig(haystack="needles", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": NiahConfig(haystack="prose", num_values=4),
    "niah_multiquery": NiahConfig(haystack="prose", num_keys=4, num_queries=4),
}


def join_query(keys: list[str]) -> str:
    """``"a"``, ``"a and b"`` or ``"a, b, and c"`` (RULER's multi-query phrasing)."""
    if len(keys) == 1:
        return keys[0]
    if len(keys) == 2:
        return f"{keys[0]} and {keys[1]}"
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def generate(
    tokenizer: Any,
    *,
    context_tokens: int,
    seed: int = 0,
    split: str = "eval",
    index: int = 0,
    depth: float | None = None,
    task: str = "niah_single_1",
    config: NiahConfig | None = None,
) -> Sample:
    """Generate one needle-in-a-haystack sample of about ``context_tokens`` context tokens."""
    cfg = config or VARIANTS[task]
    if not 1 <= cfg.num_queries <= cfg.num_keys:
        raise ValueError("need 1 <= num_queries <= num_keys")
    rng = make_rng(task, split, seed, index)
    template_id, tpl = pick_template(TEMPLATES, split, rng)
    kind, kinds = KIND_LABELS[split][cfg.value_kind]

    for _attempt in range(20):
        keys = distinct_values(rng, cfg.key_kind, split, cfg.num_keys)
        values = distinct_values(rng, cfg.value_kind, split, cfg.num_keys * cfg.num_values, exclude=set(keys))
        needles = [  # needle i holds value i, of key i // num_values; queried keys come first
            tpl.needle.format(kind=kind, kinds=kinds, key=k, value=values[i * cfg.num_values + j])
            for i, k in enumerate(keys)
            for j in range(cfg.num_values)
        ]
        depths = sample_depths(rng, len(needles), depth)
        query_keys = keys[: cfg.num_queries]
        answers = values[: cfg.num_queries * cfg.num_values]
        intro = tpl.intro.format(kind=kind, kinds=kinds)
        pieces_of, sep, unit_tokens = _haystack(cfg, tpl, rng, split, kind, kinds, set(keys) | set(values), tokenizer)

        def build(n: int) -> tuple[str, list[tuple[int, int]]]:  # used within this attempt only
            pieces = pieces_of(n)
            slots = [depth_to_slot(d, len(pieces)) for d in depths]
            body, spans = insert_needles(pieces, needles, slots, sep=sep)
            return join_context(intro, body, spans)

        context, spans, got, tol = fit_context(tokenizer, build, context_tokens, unit_tokens=unit_tokens, task=task)
        if check_occurrences(context, needles, 1) and check_occurrences(context, answers, 1):
            break
    else:  # pragma: no cover - needs 20 collisions in a row
        raise RuntimeError(f"{task}: could not place unique needles")

    query = join_query(query_keys)
    n_ans = len(answers)
    return make_sample(
        tokenizer=tokenizer,
        task=task,
        split=split,
        seed=seed,
        index=index,
        template_id=template_id,
        context=context,
        question=tpl.question.format(kind=kind, kinds=kinds, query=query),
        answer_prefix=tpl.answer_prefix.format(kind=kind, kinds=kinds, query=query),
        answers=answers,
        max_new_tokens=cfg.max_new_tokens,
        context_tokens=got,
        target_tokens=context_tokens,
        tol=tol,
        needle_spans=spans[:n_ans],
        depths=depths,
        keys=keys,
        query_keys=query_keys,
        distractor_spans=[list(s) for s in spans[n_ans:]],
        haystack=cfg.haystack,
    )


def _haystack(cfg: NiahConfig, tpl: PromptTemplate, rng: random.Random, split: str, kind: str, kinds: str,
              used: set[str], tokenizer: Any):
    """``(pieces_of(n), separator, tokens_per_unit)`` for the configured haystack."""
    if cfg.haystack == "noise":
        return (lambda n: noise_pieces(split, n)), " ", count_tokens(tokenizer, noise_block(split))
    if cfg.haystack == "prose":
        stream = ProseStream.random(split, rng)
        return stream.pieces, " ", 0
    if cfg.haystack == "needles":
        lines = _DistractorLines(cfg, tpl, random.Random(rng.getrandbits(64)), split, kind, kinds, used)
        return lines.pieces_and_size(tokenizer)
    raise ValueError(f"unknown haystack {cfg.haystack!r}")


class _DistractorLines:
    """RULER's needle haystack: lines in the needle's own format with other keys and values.

    Lines are drawn lazily from a private RNG, so the first ``n`` lines do not depend on ``n``.
    """

    def __init__(self, cfg: NiahConfig, tpl: PromptTemplate, rng: random.Random, split: str, kind: str,
                 kinds: str, used: set[str]):
        self.cfg, self.tpl, self.rng, self.split = cfg, tpl, rng, split
        self.kind, self.kinds = kind, kinds
        self.used = set(used)
        self.lines: list[str] = []

    def _extend(self, n: int) -> None:
        while len(self.lines) < n:
            key = distinct_values(self.rng, self.cfg.key_kind, self.split, 1, exclude=self.used)[0]
            self.used.add(key)
            value = distinct_values(self.rng, self.cfg.value_kind, self.split, 1, exclude=self.used)[0]
            self.used.add(value)
            self.lines.append(self.tpl.needle.format(kind=self.kind, kinds=self.kinds, key=key, value=value))

    def pieces(self, n: int) -> list[str]:
        self._extend(n)
        return [line + "\n" for line in self.lines[:n]]

    def pieces_and_size(self, tokenizer: Any):
        self._extend(1)
        return self.pieces, "\n", count_tokens(tokenizer, self.lines[0])
