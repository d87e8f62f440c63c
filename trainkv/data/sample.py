"""One evaluation/training sample of a synthetic long-context task.

The fields follow kvpress's dataset schema (``context, question, answer_prefix, answer,
max_new_tokens, task``), which itself follows RULER (Hsieh et al. 2024, arXiv 2404.06654): the
context (task instruction + haystack) comes first and is what a query-agnostic method compresses;
the question comes after it; the answer prefix is given to the model as the start of its reply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METRIC_NAMES = ("all", "part")


@dataclass
class Sample:
    """A generated sample.

    Attributes:
        context: instruction + haystack with the needles; the part that is compressed.
        question: the query, placed after the context.
        answer_prefix: the beginning of the answer, fed to the model before it generates.
        answers: gold strings (kvpress calls this column ``answer``).
        max_new_tokens: generation budget (RULER's ``tokens_to_generate``).
        task: registry name, e.g. ``"niah_single_1"``.
        metric: ``"all"`` (RULER ``string_match_all``) or ``"part"`` (``string_match_part``).
        context_tokens: measured length of ``context`` with the generating tokenizer (no special tokens).
        seed: the base seed the sample was generated from.
        split: ``"train"`` or ``"eval"``.
        needle_spans: ``[start, end)`` character spans in ``context`` of the text that carries the
            answer (the needles); empty for tasks whose answer is spread over the whole context.
        metadata: everything else (sample index, target length, depth, template id, haystack, ...).
    """

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    task: str
    metric: str = "all"
    context_tokens: int = 0
    seed: int = 0
    split: str = "eval"
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"metric must be one of {METRIC_NAMES}, got {self.metric!r}")
        self.answers = list(self.answers)
        self.needle_spans = [(int(a), int(b)) for a, b in self.needle_spans]

    def needles(self) -> list[str]:
        """The text of each needle span."""
        return [self.context[a:b] for a, b in self.needle_spans]

    def to_kvpress_row(self) -> dict[str, Any]:
        """A row in kvpress's dataframe schema (``answer`` holds the list of gold strings)."""
        return {
            "context": self.context,
            "question": self.question,
            "answer_prefix": self.answer_prefix,
            "answer": list(self.answers),
            "max_new_tokens": self.max_new_tokens,
            "task": self.task,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (spans become lists)."""
        d = asdict(self)
        d["needle_spans"] = [list(s) for s in self.needle_spans]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        """Inverse of :meth:`to_dict`; also accepts a kvpress row (``answer`` instead of ``answers``)."""
        d = dict(d)
        if "answers" not in d and "answer" in d:
            ans = d.pop("answer")
            d["answers"] = [ans] if isinstance(ans, str) else list(ans)
        known = set(cls.__dataclass_fields__)
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        sample = cls(**d)
        if extra:
            sample.metadata = {**sample.metadata, **extra}
        return sample
