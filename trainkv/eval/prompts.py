"""Turn a :class:`~trainkv.data.Sample` into token ids: the context (what eviction compresses) and the
question part (question + end of the user turn + start of the assistant turn + answer prefix).

The split follows kvpress's pipeline (``kvpress/pipeline.py``, ``preprocess``): the chat template is
applied to ``context + SEPARATOR + <marker>`` as the one user message, the rendered text is cut at the
marker, and the two halves are tokenized separately without special tokens::

    context_ids  = tok(<chat prefix> + sample.context + "\\n")
    question_ids = tok(sample.question + <end of user turn, start of assistant turn> + sample.answer_prefix)

The ``"\\n"`` between context and question is RULER's: its templates read ``...{context}\\nWhat are all
the special magic numbers for {query} ...``; kvpress's RULER rows keep it at the end of the context.
``full_ids = context_ids + question_ids`` is the prompt the model reads; :func:`build_prompt` also
checks that tokenizing the whole prompt text at once gives the same ids (``check=True``), i.e. that the
context is a token prefix of the full prompt and the cut falls on a token boundary.

:func:`kvpress_row` gives the kvpress dataframe row whose pipeline tokenization reproduces exactly these
ids (``context`` carries the separator), so both libraries compress the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainkv.data.sample import Sample

#: Text between the context and the question (RULER's template has a newline there).
SEPARATOR = "\n"


@dataclass(frozen=True)
class Prompt:
    """Token ids of one sample's prompt, split at the end of the context."""

    context_ids: list[int]
    question_ids: list[int]
    max_new_tokens: int

    @property
    def full_ids(self) -> list[int]:
        return [*self.context_ids, *self.question_ids]

    @property
    def context_tokens(self) -> int:
        """Tokens that eviction compresses (chat-template prefix + context + separator)."""
        return len(self.context_ids)


def _chat_split(tokenizer: Any, context: str) -> tuple[str, str]:
    """``(text before, text after)`` the question when the chat template wraps ``context`` + question.

    As kvpress: render the template around ``context + marker`` and cut at the marker.
    """
    marker = "#" * (len(context) + 10)  # cannot occur inside the context
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + marker}], add_generation_prompt=True, tokenize=False
    )
    if rendered.count(marker) != 1:
        raise ValueError("the chat template changed the message text; cannot split context from question")
    before, after = rendered.split(marker)
    return before, after


def prompt_texts(sample: Sample, tokenizer: Any, chat: bool = True, separator: str = SEPARATOR) -> tuple[str, str]:
    """``(context text, question text)`` as fed to the tokenizer (chat template applied when ``chat``)."""
    context = sample.context + separator
    if chat and getattr(tokenizer, "chat_template", None):
        before, after = _chat_split(tokenizer, context)
        return before, sample.question + after + sample.answer_prefix
    # no chat template: as kvpress, BOS + context, and a newline between question and answer prefix
    bos = getattr(tokenizer, "bos_token", None) or ""
    return bos + context, sample.question + "\n" + sample.answer_prefix


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_prompt(
    sample: Sample, tokenizer: Any, chat: bool = True, separator: str = SEPARATOR, check: bool = True,
    max_new_tokens: int | None = None,
) -> Prompt:
    """The :class:`Prompt` of ``sample``; ``max_new_tokens`` caps the sample's own generation budget.

    With ``check``, raises ``ValueError`` if tokenizing the whole prompt text does not give
    ``context_ids + question_ids`` (the cut would then not be a token boundary).
    """
    context_text, question_text = prompt_texts(sample, tokenizer, chat, separator)
    context_ids = encode(tokenizer, context_text)
    question_ids = encode(tokenizer, question_text)
    if check:
        joint = encode(tokenizer, context_text + question_text)
        if joint != context_ids + question_ids:
            raise ValueError(
                f"{sample.task}[{sample.metadata.get('index')}]: the context is not a token prefix of the full "
                "prompt (the context/question cut splits a token); change the separator"
            )
    budget = sample.max_new_tokens if max_new_tokens is None else min(sample.max_new_tokens, max_new_tokens)
    return Prompt(context_ids, question_ids, int(budget))


def kvpress_row(sample: Sample, separator: str = SEPARATOR) -> dict[str, Any]:
    """``sample`` as a kvpress row whose pipeline tokenization equals :func:`build_prompt`'s ids."""
    row = sample.to_kvpress_row()
    row["context"] = sample.context + separator
    return row


__all__ = ["SEPARATOR", "Prompt", "build_prompt", "kvpress_row", "prompt_texts"]
