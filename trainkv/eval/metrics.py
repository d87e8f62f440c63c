"""RULER's string-match metrics (Hsieh et al. 2024, arXiv 2404.06654), as kvpress reports them.

* ``string_match_all``: per sample, the fraction of the reference strings found in the prediction
  (case-insensitive substring test); averaged over samples and scaled to 0-100. Used for the niah,
  vt, cwe, fwe (and passkey / kv_retrieval) tasks.
* ``string_match_part``: per sample, 1 if any reference string is found, else 0; averaged, x100.
  Used by RULER for its QA tasks.

The per-sample functions return the same 0-100 scale, so the mean of the per-sample scores is the
aggregate score.
"""

from __future__ import annotations

from typing import Callable, Sequence

Refs = str | Sequence[str]


def _as_list(refs: Refs) -> list[str]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("a sample needs at least one reference string")
    return refs


def sample_string_match_all(pred: str, refs: Refs) -> float:
    """100 x the fraction of ``refs`` that occur in ``pred`` (case-insensitive)."""
    refs = _as_list(refs)
    p = pred.lower()
    return 100.0 * sum(r.lower() in p for r in refs) / len(refs)


def sample_string_match_part(pred: str, refs: Refs) -> float:
    """100 if any of ``refs`` occurs in ``pred`` (case-insensitive), else 0."""
    p = pred.lower()
    return 100.0 if any(r.lower() in p for r in _as_list(refs)) else 0.0


def _check(preds: Sequence[str], refs: Sequence[Refs]) -> None:
    if isinstance(preds, str):
        raise TypeError("preds must be a sequence of predictions, not one string")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} reference lists")
    if not preds:
        raise ValueError("no samples to score")


def per_sample_string_match_all(preds: Sequence[str], refs: Sequence[Refs]) -> list[float]:
    _check(preds, refs)
    return [sample_string_match_all(p, r) for p, r in zip(preds, refs)]


def per_sample_string_match_part(preds: Sequence[str], refs: Sequence[Refs]) -> list[float]:
    _check(preds, refs)
    return [sample_string_match_part(p, r) for p, r in zip(preds, refs)]


def string_match_all(preds: Sequence[str], refs: Sequence[Refs]) -> float:
    """RULER ``string_match_all`` over a set of samples, 0-100."""
    scores = per_sample_string_match_all(preds, refs)
    return sum(scores) / len(scores)


def string_match_part(preds: Sequence[str], refs: Sequence[Refs]) -> float:
    """RULER ``string_match_part`` over a set of samples, 0-100."""
    scores = per_sample_string_match_part(preds, refs)
    return sum(scores) / len(scores)


#: ``Sample.metric`` name -> (aggregate, per-sample list, single sample) functions.
METRICS: dict[str, tuple[Callable[..., float], Callable[..., list[float]], Callable[[str, Refs], float]]] = {
    "all": (string_match_all, per_sample_string_match_all, sample_string_match_all),
    "part": (string_match_part, per_sample_string_match_part, sample_string_match_part),
}


def score(metric: str, preds: Sequence[str], refs: Sequence[Refs]) -> float:
    """Aggregate score of ``metric`` (``"all"`` or ``"part"``, as in ``Sample.metric``)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric][0](preds, refs)
