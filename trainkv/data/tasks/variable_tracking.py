"""Variable tracking ("vt") of RULER (Hsieh et al. 2024, arXiv 2404.06654, Sec. 3.1 "Multi-hop tracing").

A chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` copies) is scattered through the noise
haystack in order; the model must list every variable that ends up holding the value. Further chains
with other values (``num_chains > 1``) are distractors. RULER's defaults: 1 chain, 4 hops.
"""

from __future__ import annotations

import random
import string
from typing import Any

from trainkv.data.haystack import depth_to_slot, insert_needles, noise_block, noise_pieces
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
)

TASK = "vt"
MAX_NEW_TOKENS = 30

#: ``needle`` assigns a value ({name}, {value}); ``extra[0]`` copies a variable ({name}, {source}).
#: Question/answer placeholders: {value}, {count}.
TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "eval": (  # RULER's wording
        PromptTemplate(
            intro="Memorize and track the chain(s) of variable assignment hidden in the following text.",
            needle="VAR {name} = {value}.",
            extra=("VAR {name} = VAR {source}.",),
            question="Question: Find all variables that are assigned the value {value} in the text above.",
            answer_prefix="Answer: According to the chain(s) of variable assignment in the text above, {count} "
            "variables are assigned the value {value}, they are:",
        ),
    ),
    "train": (
        PromptTemplate(
            intro="Keep track of the variable assignments scattered through the text below.",
            needle="SET {name} TO {value}.",
            extra=("SET {name} TO {source}.",),
            question="Which variables end up holding the value {value}?",
            answer_prefix="Following the assignments, {count} variables hold the value {value}, namely:",
        ),
        PromptTemplate(
            intro="A chain of copies between named variables is hidden in the filler below. Follow every link.",
            needle="Let {name} be {value}.",
            extra=("Let {name} be a copy of {source}.",),
            question="Name each variable whose final value is {value}.",
            answer_prefix="The {count} variables whose final value is {value} are:",
        ),
    ),
}


def _names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct five-letter upper-case variable names."""
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in out:
            out.append(name)
    return out


def generate(
    tokenizer: Any,
    *,
    context_tokens: int,
    seed: int = 0,
    split: str = "eval",
    index: int = 0,
    depth: float | None = None,
    task: str = TASK,
    num_chains: int = 1,
    num_hops: int = 4,
) -> Sample:
    """One variable-tracking sample. ``depth`` fixes where the queried chain starts (its first line)."""
    rng = make_rng(task, split, seed, index)
    template_id, tpl = pick_template(TEMPLATES, split, rng)
    copy_line = tpl.extra[0]
    per_chain = num_hops + 1

    for _attempt in range(20):
        names = _names(rng, num_chains * per_chain)
        values = []
        while len(values) < num_chains:
            v = str(rng.randint(10000, 99999))
            if v not in values:
                values.append(v)
        chains = [names[c * per_chain:(c + 1) * per_chain] for c in range(num_chains)]
        needles: list[str] = []
        depths: list[float] = []
        for c, chain in enumerate(chains):
            lines = [tpl.needle.format(name=chain[0], value=values[c])]
            lines += [copy_line.format(name=chain[i], source=chain[i - 1]) for i in range(1, per_chain)]
            ds = sorted(rng.random() for _ in range(per_chain))  # in order: a copy follows its source
            if c == 0 and depth is not None:  # start the queried chain at `depth`
                if not 0.0 <= depth <= 1.0:
                    raise ValueError(f"depth must be in [0, 1], got {depth}")
                ds = [depth] + [depth + (1.0 - depth) * d for d in ds[1:]]
            needles += lines
            depths += ds
        intro = tpl.intro

        def build(n: int) -> tuple[str, list[tuple[int, int]]]:
            pieces = noise_pieces(split, n)
            slots = [depth_to_slot(d, len(pieces)) for d in depths]
            body, spans = insert_needles(pieces, needles, slots)
            return join_context(intro, body, spans)

        context, spans, got, tol = fit_context(
            tokenizer, build, context_tokens, unit_tokens=count_tokens(tokenizer, noise_block(split)), task=task
        )
        if check_occurrences(context, needles, 1) and check_occurrences(context, values, 1):
            break
    else:  # pragma: no cover
        raise RuntimeError(f"{task}: could not place unique chains")

    answers = chains[0]
    return make_sample(
        tokenizer=tokenizer,
        task=task,
        split=split,
        seed=seed,
        index=index,
        template_id=template_id,
        context=context,
        question=tpl.question.format(value=values[0], count=len(answers)),
        answer_prefix=tpl.answer_prefix.format(value=values[0], count=len(answers)),
        answers=answers,
        max_new_tokens=MAX_NEW_TOKENS,
        context_tokens=got,
        target_tokens=context_tokens,
        tol=tol,
        needle_spans=spans[:per_chain],
        depths=depths[:per_chain],
        value=values[0],
        distractor_spans=[list(s) for s in spans[per_chain:]],
        haystack="noise",
    )
