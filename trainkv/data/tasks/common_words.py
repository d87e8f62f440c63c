"""Common words extraction ("cwe") of RULER (Hsieh et al. 2024, arXiv 2404.06654, Sec. 3.1 "Aggregation").

A numbered list in which ``num_cw`` common words appear ``freq_cw`` times each and every other word
``freq_ucw`` times; the model must name the common words. RULER uses 10 words x 30 vs x 3. The
list length is sized with the number of uncommon words. At short contexts, where 300 common items
would not fit, ``freq_cw`` shrinks so that the common items take about half the list (never below
``freq_ucw + 3``). RULER's in-context example is left out. Words come from the split's word list
(:func:`trainkv.data.vocab.english_words`), which TRAIN and EVAL do not share. With about 1,150
words per split, three occurrences each fill about 25K tokens; a longer target gives every uncommon word
more occurrences (``freq_ucw`` raised to the fewest that fill it, e.g. 4 at 32K: common words still
appear ``freq_cw`` = 30 times), so the task is the same question at every length. Very short targets
(under about 400 tokens) cannot hold the 10 x 6 common items and raise.
"""

from __future__ import annotations

import random
from typing import Any

from trainkv.data.sample import Sample
from trainkv.data.sizing import count_tokens, tolerance
from trainkv.data.tasks._base import PromptTemplate, fit_context, join_context, make_rng, make_sample, pick_template
from trainkv.data.vocab import english_words

TASK = "cwe"
MAX_NEW_TOKENS = 120

#: Placeholder: {count} (number of common words).
TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "eval": (  # RULER's wording
        PromptTemplate(
            intro="Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.",
            question="Question: What are the {count} most common words in the above list?",
            answer_prefix="Answer: The top {count} words that appear most often in the list are:",
        ),
    ),
    "train": (
        PromptTemplate(
            intro="Here is a long numbered list of words; a few of them are repeated far more often than the rest.",
            question="Which {count} words occur the greatest number of times in the list?",
            answer_prefix="The {count} words that occur the greatest number of times are:",
        ),
        PromptTemplate(
            intro="Study the enumerated words below and notice which ones keep coming back.",
            question="List the {count} words that are repeated most frequently above.",
            answer_prefix="The {count} most frequently repeated words are:",
        ),
    ),
}


def numbered_list(words: list[str]) -> str:
    """``"1. apple 2. pear ..."`` (RULER's list format)."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def generate(
    tokenizer: Any,
    *,
    context_tokens: int,
    seed: int = 0,
    split: str = "eval",
    index: int = 0,
    depth: float | None = None,  # no needle: accepted for a uniform signature, ignored
    task: str = TASK,
    num_cw: int = 10,
    freq_cw: int = 30,
    freq_ucw: int = 3,
) -> Sample:
    """One common-words sample of about ``context_tokens`` tokens."""
    rng = make_rng(task, split, seed, index)
    template_id, tpl = pick_template(TEMPLATES, split, rng)
    vocab = list(english_words(split))
    rng.shuffle(vocab)
    common, pool = vocab[:num_cw], vocab[num_cw:]
    order_seed = rng.getrandbits(64)
    intro = tpl.intro

    # shrink the common-word frequency for short contexts (estimate tokens per list item first)
    probe = numbered_list(pool[:100])
    per_item = count_tokens(tokenizer, probe) / 100
    items_budget = max(1.0, (context_tokens - count_tokens(tokenizer, intro)) / per_item)

    def builder(f: int):
        freq = min(freq_cw, max(f + 3, int(items_budget * 0.5 / num_cw)))

        def build(m: int) -> tuple[str, list[tuple[int, int]]]:
            items = common * freq + [w for w in pool[:m] for _ in range(f)]
            random.Random(order_seed).shuffle(items)
            return join_context(intro, numbered_list(items), [])

        return freq, build

    freq, build = builder(freq_ucw)
    # a target the split's words cannot fill at freq_ucw occurrences: the fewest occurrences that fill it
    while items_budget > 0.8 * (num_cw * freq + len(pool) * freq_ucw):
        short = count_tokens(tokenizer, build(len(pool))[0]) < context_tokens - tolerance(context_tokens, 0)
        if not short or freq_ucw + 4 > freq_cw:
            break
        freq_ucw += 1
        freq, build = builder(freq_ucw)

    context, _, got, tol = fit_context(
        tokenizer, build, context_tokens, unit_tokens=round(per_item * freq_ucw), task=task, lo=0, hi=len(pool)
    )
    return make_sample(
        tokenizer=tokenizer,
        task=task,
        split=split,
        seed=seed,
        index=index,
        template_id=template_id,
        context=context,
        question=tpl.question.format(count=num_cw),
        answer_prefix=tpl.answer_prefix.format(count=num_cw),
        answers=common,
        max_new_tokens=MAX_NEW_TOKENS,
        context_tokens=got,
        target_tokens=context_tokens,
        tol=tol,
        needle_spans=[],
        freq_cw=freq,
        freq_ucw=freq_ucw,
        haystack="word-list",
    )
