"""Size a generated context to a target token count with the evaluated model's tokenizer.

RULER (Hsieh et al. 2024, arXiv 2404.06654) sizes every sample by binary search on the number of
haystack units with the evaluated model's tokenizer. We do the same, but search with a secant step
(tokens grow almost linearly with units), so a sample needs a handful of tokenizations instead of
re-tokenizing for every unit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

T = TypeVar("T")

REL_TOL = 0.05
ABS_TOL = 32


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` as it is fed (no BOS/EOS or other special tokens added).

    ``tokenizer`` is a HF tokenizer (anything with ``encode``) or a plain ``str -> int`` counter.
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        return len(encode(text, add_special_tokens=False))
    return int(tokenizer(text))


def tolerance(target: int, granularity: int = 0) -> int:
    """Allowed ``|measured - target|``: 5% of the target or 32 tokens, whichever is larger.

    ``granularity`` is the token size of the task's smallest haystack unit; when one unit is bigger
    than twice the tolerance (e.g. a UUID key-value pair at 500 tokens with a tokenizer that splits
    digits), the tolerance widens to half a unit, the best any unit count can do.
    """
    return max(math.ceil(REL_TOL * target), ABS_TOL, math.ceil(granularity / 2))


def fit_units(
    build: Callable[[int], T],
    measure: Callable[[T], int],
    target: int,
    *,
    tol: int | None = None,
    lo: int = 1,
    hi: int | None = None,
    probe: int = 8,
    max_iter: int = 32,
) -> tuple[int, T, int]:
    """Find a unit count ``n`` whose ``measure(build(n))`` is within ``tol`` of ``target``.

    ``build(n)`` must grow (weakly) with ``n``. It refines until within ``tol // 4`` (or until two
    adjacent counts straddle the target) and returns the closest ``(n, build(n), tokens)`` seen;
    the caller checks that against ``tol`` (``hi`` too small or units too coarse can miss it).
    """
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    tol = tolerance(target) if tol is None else tol
    aim = max(2, tol // 4)  # keep refining while cheap; anything within ``tol`` is acceptable
    seen: dict[int, tuple[T, int]] = {}

    def at(n: int) -> int:
        n = max(lo, n if hi is None else min(n, hi))
        if n not in seen:
            built = build(n)
            seen[n] = (built, measure(built))
        return seen[n][1]

    def clamp(n: int) -> int:
        return max(lo, n if hi is None else min(n, hi))

    def best() -> tuple[int, T, int]:
        n = min(seen, key=lambda k: (abs(seen[k][1] - target), k))
        return n, seen[n][0], seen[n][1]

    at(clamp(lo))  # two probes give the first slope
    at(clamp(lo + probe))
    for _ in range(max_iter):
        _, _, t_best = best()
        if abs(t_best - target) <= aim:
            break
        below = [k for k in seen if seen[k][1] <= target]
        above = [k for k in seen if seen[k][1] > target]
        n_lo = max(below) if below else None
        n_hi = min(above) if above else None
        if n_lo is not None and n_hi is not None:
            if n_hi - n_lo <= 1:
                break  # adjacent counts straddle the target: nothing closer exists
            t_lo, t_hi = seen[n_lo][1], seen[n_hi][1]
            slope = max((t_hi - t_lo) / (n_hi - n_lo), 1e-6)
            n = n_lo + round((target - t_lo) / slope)
            n = min(max(n, n_lo + 1), n_hi - 1)
        else:
            # extrapolate with the slope through the two most extreme points measured
            counts = sorted(seen)
            if len(counts) < 2:
                break
            k1, k2 = counts[-2:] if n_hi is None else counts[:2]
            slope = max((seen[k2][1] - seen[k1][1]) / (k2 - k1), 1e-6)
            ref = k2 if n_hi is None else k1
            n = ref + round((target - seen[ref][1]) / slope)
            if n_hi is None:
                n = max(n, ref + 1)
                if hi is not None and ref >= hi:
                    break
            else:
                n = min(n, ref - 1)
                if ref <= lo:
                    break
            n = clamp(n)
        if n in seen:
            break
        at(n)
    return best()
