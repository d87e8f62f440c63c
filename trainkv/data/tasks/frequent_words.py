"""Frequent words extraction ("fwe") of RULER (Hsieh et al. 2024, arXiv 2404.06654, Sec. 3.1 "Aggregation").

A text of random six-letter "coded" words whose counts follow a Zipf law (``count_k ~ N k^-alpha /
zeta(alpha)``, alpha = 2); the most frequent rank is replaced by a filler token ("...." in RULER)
and the model must name the next three. The context is sized with the total word count ``N``.
"""

from __future__ import annotations

import math
import random
import string
from functools import lru_cache
from typing import Any

from trainkv.data.sample import Sample
from trainkv.data.sizing import count_tokens
from trainkv.data.tasks._base import PromptTemplate, fit_context, join_context, make_rng, make_sample, pick_template

TASK = "fwe"
MAX_NEW_TOKENS = 50
NUM_ANSWERS = 3

#: Filler token that takes the top rank, per split.
FILLER = {"eval": "....", "train": "----"}

#: Placeholder: {filler}.
TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "eval": (  # RULER's wording
        PromptTemplate(
            intro="Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words.",
            question="Question: Do not provide any explanation. Please ignore the dots '{filler}'. "
            "What are the three most frequently appeared words in the above coded text?",
            answer_prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
        ),
    ),
    "train": (
        PromptTemplate(
            intro="The scrambled text below repeats some made-up words much more than others. "
            "Count how often each one occurs.",
            question="Ignoring the filler '{filler}', which three made-up words occur most often "
            "in the scrambled text?",
            answer_prefix="The three made-up words occurring most often in the scrambled text are:",
        ),
        PromptTemplate(
            intro="Below is a stream of invented tokens. Some of them show up again and again.",
            question="Skip the filler '{filler}' and name the three invented tokens seen most often.",
            answer_prefix="The three invented tokens seen most often are:",
        ),
    ),
}


@lru_cache(maxsize=8)
def zeta(alpha: float) -> float:
    """Riemann zeta for ``alpha > 1`` (partial sum plus the integral of the tail)."""
    if alpha <= 1:
        raise ValueError("alpha must be > 1")
    n = 100_000
    return math.fsum(k**-alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1)


def zipf_counts(num_words: int, vocab_size: int, alpha: float = 2.0) -> list[int]:
    """``floor(N k^-alpha / zeta(alpha))`` for ranks ``k = 1..vocab_size``."""
    z = zeta(alpha)
    return [math.floor(num_words * k**-alpha / z) for k in range(1, vocab_size + 1)]


def coded_words(rng: random.Random, n: int, length: int = 6) -> list[str]:
    """``n`` distinct random lower-case words of ``length`` letters."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choices(string.ascii_lowercase, k=length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def generate(
    tokenizer: Any,
    *,
    context_tokens: int,
    seed: int = 0,
    split: str = "eval",
    index: int = 0,
    depth: float | None = None,  # no needle: accepted for a uniform signature, ignored
    task: str = TASK,
    alpha: float = 2.0,
    vocab_size: int = 2000,
) -> Sample:
    """One frequent-words sample of about ``context_tokens`` tokens."""
    rng = make_rng(task, split, seed, index)
    template_id, tpl = pick_template(TEMPLATES, split, rng)
    filler = FILLER[split]
    vocab = [filler] + coded_words(rng, vocab_size - 1)
    order_seed = rng.getrandbits(64)
    intro = tpl.intro

    def build(n: int) -> tuple[str, list[tuple[int, int]]]:
        words = [w for w, c in zip(vocab, zipf_counts(n, vocab_size, alpha)) for _ in range(c)]
        random.Random(order_seed).shuffle(words)
        return join_context(intro, " ".join(words), [])

    per_word = count_tokens(tokenizer, " ".join(vocab[1:101])) / 100
    context, _, got, tol = fit_context(
        tokenizer, build, context_tokens, unit_tokens=round(per_word), task=task, lo=NUM_ANSWERS + 2
    )
    counts = {w: context.split().count(w) for w in vocab[: NUM_ANSWERS + 2]}
    ranked = [counts[w] for w in vocab[: NUM_ANSWERS + 2]]
    if any(a <= b for a, b in zip(ranked, ranked[1:])):
        raise ValueError(f"{task}: {context_tokens} tokens are too few for distinct top-{NUM_ANSWERS} counts {ranked}")
    answers = vocab[1 : NUM_ANSWERS + 1]
    return make_sample(
        tokenizer=tokenizer,
        task=task,
        split=split,
        seed=seed,
        index=index,
        template_id=template_id,
        context=context,
        question=tpl.question.format(filler=filler),
        answer_prefix=tpl.answer_prefix,
        answers=answers,
        max_new_tokens=MAX_NEW_TOKENS,
        context_tokens=got,
        target_tokens=context_tokens,
        tol=tol,
        needle_spans=[],
        counts=ranked,
        filler=filler,
        alpha=alpha,
        haystack="coded-words",
    )
