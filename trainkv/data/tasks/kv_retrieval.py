"""Key-value retrieval over a JSON object of UUIDs (InfiniteBench ``kv_retrieval``, Zhang et al. 2024,
arXiv 2402.13718; RULER's niah_multikey_3 is the same idea in sentence form, Hsieh et al. 2024,
arXiv 2404.06654).

The context is one JSON object ``{"<uuid>": "<uuid>", ...}``; the queried pair sits at the requested
depth among distractor pairs, and its key and value occur in the context exactly once. One pair is
about 80 tokens on tokenizers that split digits, so at short contexts the sizing tolerance widens to
half a pair (see :func:`trainkv.data.sizing.tolerance`).
"""

from __future__ import annotations

import json
import random
from typing import Any

from trainkv.data.haystack import depth_to_slot
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
from trainkv.data.vocab import random_uuid

TASK = "kv_retrieval"
MAX_NEW_TOKENS = 64

#: Placeholder: {key}.
TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "eval": (  # InfiniteBench's wording
        PromptTemplate(
            intro="Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:",
            question='Key: "{key}"',
            answer_prefix="The value associated with the specified key is:",
        ),
    ),
    "train": (
        PromptTemplate(
            intro="Look up entries in the following JSON dictionary when asked.\n\nDictionary:",
            question='Which string is stored under the key "{key}"?',
            answer_prefix="The string stored under that key is:",
        ),
        PromptTemplate(
            intro="A JSON mapping from identifiers to identifiers follows. Be ready to retrieve any entry.",
            question='Retrieve the entry for "{key}".',
            answer_prefix="The entry stored for that identifier is:",
        ),
    ),
}


def json_object(pairs: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Serialise pairs as a one-line JSON object; returns it and the span of every ``"k": "v"``."""
    parts, spans, pos = [], [], 1
    for k, v in pairs:
        item = f"{json.dumps(k)}: {json.dumps(v)}"
        spans.append((pos, pos + len(item)))
        parts.append(item)
        pos += len(item) + 2
    return "{" + ", ".join(parts) + "}", spans


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
    """One key-value retrieval sample of about ``context_tokens`` tokens."""
    rng = make_rng(task, split, seed, index)
    template_id, tpl = pick_template(TEMPLATES, split, rng)
    key, value = random_uuid(rng), random_uuid(rng)
    (d,) = sample_depths(rng, 1, depth)
    pair_rng = random.Random(rng.getrandbits(64))
    distractors: list[tuple[str, str]] = []
    used = {key, value}

    def pairs_upto(n: int) -> list[tuple[str, str]]:
        while len(distractors) < n:  # lazily, so the first n pairs do not depend on n
            k, v = random_uuid(pair_rng), random_uuid(pair_rng)
            if k not in used and v not in used and k != v:
                used.update((k, v))
                distractors.append((k, v))
        return distractors[:n]

    def build(n: int) -> tuple[str, list[tuple[int, int]]]:
        pairs = pairs_upto(n)
        slot = depth_to_slot(d, len(pairs))
        body, spans = json_object(pairs[:slot] + [(key, value)] + pairs[slot:])
        return join_context(tpl.intro, body, [spans[slot]])

    unit = count_tokens(tokenizer, json_object(pairs_upto(1))[0]) - 2
    context, spans, got, tol = fit_context(tokenizer, build, context_tokens, unit_tokens=unit, task=task, lo=0)
    if not check_occurrences(context, [key, value], 1):  # pragma: no cover - UUID collision
        raise RuntimeError(f"{task}: key or value repeated")
    return make_sample(
        tokenizer=tokenizer,
        task=task,
        split=split,
        seed=seed,
        index=index,
        template_id=template_id,
        context=context,
        question=tpl.question.format(key=key),
        answer_prefix=tpl.answer_prefix,
        answers=[value],
        max_new_tokens=MAX_NEW_TOKENS,
        context_tokens=got,
        target_tokens=context_tokens,
        tol=tol,
        needle_spans=spans,
        depths=[d],
        key=key,
        haystack="json-kv",
    )
