"""95% bootstrap intervals for evaluation cells and for the claims made from them (docs/protocol.md).

A cell's score is the mean RULER score over its samples. Its interval resamples the samples with replacement
*within each task* (stratified: every resample keeps each task's sample count, as the evaluation does), 2000 times,
and takes the 2.5th and 97.5th percentiles of the resampled means (percentile bootstrap).

A claim compares two cells at the same context length on the *same samples*: "X keeps 97% of full" is the ratio
``mean(X) / mean(full)`` and "X beats Y" the difference ``mean(X) - mean(Y)``, computed on the samples both run files
hold, matched by their key ``(task, seed, index)``. The paired bootstrap draws one set of sample indices per resample
and applies it to both runs, so what the two runs share (a hard sample is hard for both) cancels; the interval is
narrower than two independent intervals would suggest, and it is the one that answers the question.

Everything is seeded (:data:`BOOTSTRAP_SEED`): the same run files give the same intervals, on any machine.

    from trainkv.eval.intervals import cell_interval, keeps_claim, beats_claim
    cell_interval(run["results"])                     # Interval(point=46.0, lo=41.2, hi=50.9, n=176)
    keeps_claim(ag_run, full_run).sentence()          # 'attention_gate keeps 97% [91, 103] of full at 2048 x 1/8 (n=176)'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 20251126
#: "keeps at least this share of the full cache" (the README's 90% claims)
KEEP_THRESHOLD = 90.0

Results = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval over ``n`` samples (``n`` pairs for a paired statistic)."""

    point: float
    lo: float
    hi: float
    n: int

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def fmt(self, nd: int = 1, unit: str = "") -> str:
        """``97.0 [91.2, 103.1]`` (``unit`` after each number, e.g. ``%``)."""
        def f(x: float) -> str:
            return "–" if x is None or math.isnan(x) else f"{x:.{nd}f}{unit}"
        return f"{f(self.point)} [{f(self.lo)}, {f(self.hi)}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_key(result: dict[str, Any]) -> tuple:
    """What identifies a sample across run files: ``(task, seed, index)`` (the generators' inputs besides length)."""
    return (result["task"], result.get("seed"), result.get("index"))


# ---------------------------------------------------------------------------------------------------------
# the resampling
# ---------------------------------------------------------------------------------------------------------
def _strata(tasks: Sequence[str]) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t, []).append(i)
    return [np.asarray(v) for _, v in sorted(groups.items())]


def resample_indices(tasks: Sequence[str], n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[n_resamples, n]`` sample indices: each row draws, within every task, as many samples as the task has."""
    rng = np.random.default_rng(seed)
    cols = [group[rng.integers(0, len(group), size=(n_resamples, len(group)))] for group in _strata(tasks)]
    return np.concatenate(cols, axis=1) if cols else np.zeros((n_resamples, 0), dtype=int)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, 100.0 * a / np.where(b > 0, b, 1.0), np.nan)


def _interval(stat: Callable[[np.ndarray, np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray, idx: np.ndarray,
              level: float) -> Interval:
    point = float(stat(np.asarray([a.mean()]), np.asarray([b.mean()]))[0]) if len(a) else math.nan
    if not len(a):
        return Interval(math.nan, math.nan, math.nan, 0)
    lo, hi = _percentiles(stat(a[idx].mean(axis=1), b[idx].mean(axis=1)), level)
    return Interval(point, lo, hi, len(a))


def _scores(results: Results) -> tuple[np.ndarray, list[str]]:
    return np.asarray([float(r["score"]) for r in results]), [r["task"] for r in results]


# ---------------------------------------------------------------------------------------------------------
# one cell
# ---------------------------------------------------------------------------------------------------------
def cell_interval(results: Results, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                  level: float = LEVEL) -> Interval:
    """Mean score of a cell (0-100) with its task-stratified bootstrap interval."""
    scores, tasks = _scores(results)
    if not len(scores):
        return Interval(math.nan, math.nan, math.nan, 0)
    idx = resample_indices(tasks, n_resamples, seed)
    lo, hi = _percentiles(scores[idx].mean(axis=1), level)
    return Interval(float(scores.mean()), lo, hi, len(scores))


# ---------------------------------------------------------------------------------------------------------
# two cells: paired and (for comparison) unpaired
# ---------------------------------------------------------------------------------------------------------
def pair(a: Results, b: Results) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores of the samples both runs hold (matched by :func:`sample_key`, in ``a``'s order) and their tasks.

    Refuses duplicate keys and a matched pair whose reference answers differ (not the same sample)."""
    def index(results: Results, name: str) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        for r in results:
            k = sample_key(r)
            if k in out:
                raise ValueError(f"run {name} holds sample {k} twice: cannot pair")
            out[k] = r
        return out

    ia, ib = index(a, "A"), index(b, "B")
    keys = [k for k in ia if k in ib]
    for k in keys:
        ra, rb = ia[k].get("references"), ib[k].get("references")
        if ra is not None and rb is not None and list(ra) != list(rb):
            raise ValueError(f"sample {k} has other reference answers in the two runs (other context length or "
                             "generator version?): cannot pair")
    return (np.asarray([float(ia[k]["score"]) for k in keys]), np.asarray([float(ib[k]["score"]) for k in keys]),
            [k[0] for k in keys])


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a - b


def paired_difference(a: Results, b: Results, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL) -> Interval:
    """``mean(a) - mean(b)`` in score points over the shared samples, paired bootstrap."""
    sa, sb, tasks = pair(a, b)
    return _interval(_difference, sa, sb, resample_indices(tasks, n_resamples, seed), level)


def paired_ratio(a: Results, b: Results, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> Interval:
    """``100 * mean(a) / mean(b)`` (% of ``b``, e.g. of the full cache) over the shared samples, paired bootstrap.
    Resamples where ``b`` scores 0 have no ratio and are left out."""
    sa, sb, tasks = pair(a, b)
    return _interval(_ratio, sa, sb, resample_indices(tasks, n_resamples, seed), level)


def _unpaired(stat, a: Results, b: Results, n_resamples: int, seed: int, level: float) -> Interval:
    sa, ta = _scores(a)
    sb, tb = _scores(b)
    if not len(sa) or not len(sb):
        return Interval(math.nan, math.nan, math.nan, 0)
    ma = sa[resample_indices(ta, n_resamples, seed)].mean(axis=1)
    mb = sb[resample_indices(tb, n_resamples, seed + 1)].mean(axis=1)  # independent draws
    point = float(stat(np.asarray([sa.mean()]), np.asarray([sb.mean()]))[0])
    lo, hi = _percentiles(stat(ma, mb), level)
    return Interval(point, lo, hi, min(len(sa), len(sb)))


def unpaired_difference(a: Results, b: Results, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        level: float = LEVEL) -> Interval:
    """``mean(a) - mean(b)`` resampling the two runs independently (what a reader does with two separate intervals)."""
    return _unpaired(_difference, a, b, n_resamples, seed, level)


def unpaired_ratio(a: Results, b: Results, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   level: float = LEVEL) -> Interval:
    return _unpaired(_ratio, a, b, n_resamples, seed, level)


def share_ratio(long: Results, long_full: Results, short: Results, short_full: Results, *,
                n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Interval:
    """``100 * share(long) / share(short)``, each share ``mean(method) / mean(full)`` paired on its own samples.

    The two lengths hold other samples (a sample's key names the same generator inputs, but its context and often
    its answers depend on the length), so the lengths are resampled independently: one paired index set per
    length, drawn from its own tasks. ``n`` is the smaller of the two sample counts."""
    la, lf, lt = pair(long, long_full)
    sa, sf, st = pair(short, short_full)
    il = resample_indices(lt, n_resamples, seed)
    is_ = resample_indices(st, n_resamples, seed + 1)  # independent draws
    with np.errstate(divide="ignore", invalid="ignore"):
        point = 100 * (la.mean() / lf.mean()) / (sa.mean() / sf.mean())
        stats = 100 * (la[il].mean(axis=1) / lf[il].mean(axis=1)) / (sa[is_].mean(axis=1) / sf[is_].mean(axis=1))
    lo, hi = _percentiles(stats[np.isfinite(stats)], level)
    return Interval(float(point), lo, hi, min(len(la), len(sa)))


# ---------------------------------------------------------------------------------------------------------
# claims
# ---------------------------------------------------------------------------------------------------------
def cell_name(record: dict[str, Any]) -> str:
    """``2048 x 1/8`` of a run file."""
    cfg = record["config"]
    spec = cfg["budget"].get("spec")
    if isinstance(spec, float):
        frac = Fraction(spec).limit_denominator(1024)
        keep = f"{frac.numerator}/{frac.denominator}" if abs(float(frac) - spec) < 1e-9 else f"{spec:g}"
    else:
        keep = "full" if spec is None else f"{spec} entries"
    return f"{cfg['context_length']} x {keep}"


@dataclass(frozen=True)
class Claim:
    """One claim about two run files, its paired interval and whether the interval settles it."""

    kind: str  # "keeps" (ratio to a reference, %), "beats" (difference, score points) or "holds" (share at a longer
    # context as % of the share at a shorter one: length generalization; ``other`` is the shorter cell)
    method: str
    other: str
    cell: str
    interval: Interval
    threshold: float
    verdict: str  # "holds" (whole interval past the threshold), "fails" (whole interval short of it), "open"

    def sentence(self) -> str:
        i = self.interval
        if self.kind == "keeps":
            return (f"{self.method} keeps {i.point:.0f}% [{i.lo:.0f}, {i.hi:.0f}] of {self.other} at {self.cell} "
                    f"(n={i.n}; >= {self.threshold:g}%: {self.verdict})")
        if self.kind == "holds":
            return (f"{self.method}'s share of the full cache at {self.cell} is {i.point:.0f}% [{i.lo:.0f}, {i.hi:.0f}] "
                    f"of its share at {self.other} (n={i.n} per length; >= {self.threshold:g}%: {self.verdict})")
        return (f"{self.method} - {self.other} at {self.cell}: {i.point:+.1f} [{i.lo:+.1f}, {i.hi:+.1f}] points "
                f"(n={i.n}; beats: {self.verdict})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "interval": self.interval.to_dict(), "sentence": self.sentence()}


def _verdict(interval: Interval, threshold: float, strict: bool) -> str:
    """``holds`` when the whole interval is at/above (``strict``: above) the threshold, ``fails`` when it is wholly
    on the other side, else ``open`` (the samples do not settle it)."""
    if math.isnan(interval.lo):
        return "open"
    if interval.lo > threshold or (not strict and interval.lo >= threshold):
        return "holds"
    if interval.hi < threshold or (strict and interval.hi <= threshold):
        return "fails"
    return "open"


def _label(record: dict[str, Any]) -> str:
    return record["config"]["method"]["label"]


def _same_cell_length(a: dict[str, Any], b: dict[str, Any]) -> None:
    la, lb = a["config"]["context_length"], b["config"]["context_length"]
    if la != lb:
        raise ValueError(f"runs at {la} and {lb} tokens hold other samples: compare runs at one context length")


def keeps_claim(record: dict[str, Any], reference: dict[str, Any], threshold: float = KEEP_THRESHOLD,
                **kw) -> Claim:
    """"``record`` keeps >= ``threshold`` % of ``reference``" (default: the full cache), paired ratio."""
    _same_cell_length(record, reference)
    interval = paired_ratio(record["results"], reference["results"], **kw)
    other = "full" if reference["config"]["method"]["method"] == "full" else _label(reference)
    return Claim("keeps", _label(record), other, cell_name(record), interval, threshold,
                 _verdict(interval, threshold, strict=False))


#: "a gate trained on short contexts keeps this share of its short-context share at a long one" (issue 18)
LENGTH_THRESHOLD = 85.0


def length_claim(long: dict[str, Any], long_full: dict[str, Any], short: dict[str, Any], short_full: dict[str, Any],
                 threshold: float = LENGTH_THRESHOLD, **kw) -> Claim:
    """"``long``'s share of the full cache is >= ``threshold`` % of ``short``'s" (same method, same keep, two context
    lengths): :func:`share_ratio`."""
    _same_cell_length(long, long_full)
    _same_cell_length(short, short_full)
    if _label(long) != _label(short):
        raise ValueError(f"a length claim compares one method at two lengths, got {_label(long)} and {_label(short)}")
    interval = share_ratio(long["results"], long_full["results"], short["results"], short_full["results"], **kw)
    return Claim("holds", _label(long), cell_name(short), cell_name(long), interval, threshold,
                 _verdict(interval, threshold, strict=False))


def beats_claim(record: dict[str, Any], other: dict[str, Any], margin: float = 0.0, **kw) -> Claim:
    """"``record`` scores higher than ``other``" (by more than ``margin`` points), paired difference."""
    _same_cell_length(record, other)
    interval = paired_difference(record["results"], other["results"], **kw)
    return Claim("beats", _label(record), _label(other), cell_name(record), interval, margin,
                 _verdict(interval, margin, strict=True))


__all__ = [
    "BOOTSTRAP_SEED", "Claim", "Interval", "KEEP_THRESHOLD", "LENGTH_THRESHOLD", "LEVEL", "N_RESAMPLES", "beats_claim",
    "cell_interval", "cell_name", "keeps_claim", "length_claim", "pair", "paired_difference", "paired_ratio",
    "resample_indices", "sample_key", "share_ratio", "unpaired_difference", "unpaired_ratio",
]
