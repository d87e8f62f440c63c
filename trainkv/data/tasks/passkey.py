"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300; InfiniteBench ``passkey``).

One needle holding a five-digit key, which it states twice ("The pass key is 71432. Remember it.
71432 is the pass key."), hidden at the requested depth in the repeated noise block that RULER's
niah_single_1 also uses (Hsieh et al. 2024, arXiv 2404.06654). The needle occurs exactly once.
"""

from __future__ import annotations

from typing import Any

from trainkv.data.haystack import depth_to_slot, insert_needles, noise_block, noise_pieces
from trainkv.data.sample import Sample
from trainkv.data.sizing import count_tokens
from trainkv.data.tasks._base import (
    PromptTemplate,
    fit_context,
    join_context,
    make_rng,
    make_sample,
    pick_template,
    sample_depths,
)
from trainkv.data.vocab import random_number

TASK = "passkey"
MAX_NEW_TOKENS = 16
KEY_DIGITS = 5
#: Times the key is written inside its needle (every template states it twice).
KEY_REPEATS = 2

#: Placeholder: {key}.
TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "eval": (  # InfiniteBench's / Mohtashami & Jaggi's wording
        PromptTemplate(
            intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.",
            needle="The pass key is {key}. Remember it. {key} is the pass key.",
            question="What is the pass key?",
            answer_prefix="The pass key is",
        ),
    ),
    "train": (
        PromptTemplate(
            intro="A single secret code is buried somewhere in the filler text below. Find it and keep it in mind.",
            needle="The secret code is {key}. Do not forget {key}.",
            question="What was the secret code?",
            answer_prefix="The secret code was",
        ),
        PromptTemplate(
            intro="Somewhere in the repetitive text that follows there is one access number. Memorise it.",
            needle="Your access number is {key}. Keep {key} safe.",
            question="Which access number appeared in the text?",
            answer_prefix="The access number that appeared was",
        ),
    ),
}


def generate(
    tokenizer: Any,
    *,
    context_tokens: int,
    seed: int = 0,
    split: str = "eval",
    index: int = 0,
    depth: float | None = None,
    task: str = TASK,
) -> Sample:
    """One passkey sample of about ``context_tokens`` tokens."""
    rng = make_rng(task, split, seed, index)
    template_id, tpl = pick_template(TEMPLATES, split, rng)
    key = random_number(rng, KEY_DIGITS)
    (d,) = sample_depths(rng, 1, depth)
    needle = tpl.needle.format(key=key)

    def build(n: int) -> tuple[str, list[tuple[int, int]]]:
        pieces = noise_pieces(split, n)
        body, spans = insert_needles(pieces, [needle], [depth_to_slot(d, len(pieces))])
        return join_context(tpl.intro, body, spans)

    context, spans, got, tol = fit_context(
        tokenizer, build, context_tokens, unit_tokens=count_tokens(tokenizer, noise_block(split)), task=task, lo=0
    )
    return make_sample(
        tokenizer=tokenizer,
        task=task,
        split=split,
        seed=seed,
        index=index,
        template_id=template_id,
        context=context,
        question=tpl.question,
        answer_prefix=tpl.answer_prefix,
        answers=[key],
        max_new_tokens=MAX_NEW_TOKENS,
        context_tokens=got,
        target_tokens=context_tokens,
        tol=tol,
        needle_spans=spans,
        depths=[d],
        haystack="noise",
    )
