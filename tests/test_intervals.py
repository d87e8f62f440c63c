"""Bootstrap intervals and paired claims (trainkv.eval.intervals) on hand-made run files."""

from __future__ import annotations

import random

import pytest

from trainkv.eval.intervals import (
    beats_claim, cell_interval, keeps_claim, pair, paired_difference, paired_ratio, resample_indices, unpaired_difference,
    unpaired_ratio,
)


def results(scores_by_task: dict[str, list[float]], seed: int = 7) -> list[dict]:
    return [{"task": t, "seed": seed, "index": i, "score": float(s), "references": [f"{t}-{i}"]}
            for t, scores in scores_by_task.items() for i, s in enumerate(scores)]


def run(label: str, res: list[dict], length: int = 2048, keep: float | None = 0.125, method: str | None = None) -> dict:
    budget = {"spec": keep, "label": "full" if keep is None else f"r{keep:g}"}
    return {"kind": "tasks", "config": {"context_length": length, "budget": budget,
                                        "method": {"label": label, "method": method or label}}, "results": res}


def coin_scores(n: int, p: float, rng: random.Random) -> list[float]:
    return [100.0 if rng.random() < p else 0.0 for _ in range(n)]


def test_cell_interval_contains_the_mean_and_shrinks_with_n():
    rng = random.Random(0)
    widths = []
    for n in (16, 64, 256):
        res = results({"a": coin_scores(n, 0.6, rng), "b": coin_scores(n, 0.3, rng)})
        ci = cell_interval(res)
        assert ci.n == 2 * n and ci.contains(ci.point)
        assert ci.point == pytest.approx(sum(r["score"] for r in res) / len(res))
        widths.append(ci.hi - ci.lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.35)  # ~ 1/sqrt(n)


def test_deterministic_and_seeded():
    rng = random.Random(1)
    res = results({"a": coin_scores(40, 0.5, rng), "b": coin_scores(40, 0.7, rng)})
    assert cell_interval(res) == cell_interval(res)
    assert cell_interval(res, seed=1) != cell_interval(res, seed=2)
    assert (resample_indices(["a", "b", "a"], 5, seed=3) == resample_indices(["a", "b", "a"], 5, seed=3)).all()


def test_resampling_is_stratified_by_task():
    idx = resample_indices(["x", "y", "x", "y", "y"], 200, seed=0)
    tasks = ["x", "y", "x", "y", "y"]
    for row in idx:
        assert sorted(tasks[i] for i in row) == sorted(tasks)  # every resample keeps each task's count
    # tasks that always score the same give a zero-width interval: only within-task variation counts
    ci = cell_interval(results({"easy": [100] * 10, "hard": [0] * 30}))
    assert (ci.point, ci.lo, ci.hi) == (25.0, 25.0, 25.0)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
    rng = random.Random(2)
    full, method = {}, {}
    for task in ("a", "b", "c"):
        base = [rng.random() for _ in range(60)]  # sample difficulty, shared by both runs
        full[task] = [100.0 if d < 0.6 else 0.0 for d in base]
        method[task] = [100.0 if d < 0.55 else 0.0 for d in base]  # loses the samples just below the line
    a, b = results(method), results(full)
    paired, unpaired = paired_difference(a, b), unpaired_difference(a, b)
    assert paired.point == pytest.approx(unpaired.point)
    assert (paired.hi - paired.lo) < 0.5 * (unpaired.hi - unpaired.lo)
    pr, ur = paired_ratio(a, b), unpaired_ratio(a, b)
    assert pr.contains(pr.point) and (pr.hi - pr.lo) < 0.5 * (ur.hi - ur.lo)
    assert pr.point == pytest.approx(100 * sum(r["score"] for r in a) / sum(r["score"] for r in b))


def test_pairing_uses_sample_keys_not_order():
    a = results({"a": [100, 0, 100, 0]})
    b = list(reversed(results({"a": [100, 0, 100, 100]})))
    sa, sb, tasks = pair(a, b)
    assert list(sa) == [100, 0, 100, 0] and list(sb) == [100, 0, 100, 100] and tasks == ["a"] * 4
    assert paired_difference(a, b).point == pytest.approx(-25.0)
    # only shared samples count (a run over one task family against a run over all tasks)
    fam = results({"cwe": [50, 50]})
    everything = results({"cwe": [100, 50], "niah": [0, 0, 0]})
    assert paired_ratio(fam, everything).n == 2 and paired_ratio(fam, everything).point == pytest.approx(100 * 50 / 75)
    other = [dict(r, references=["something else"]) for r in a]
    with pytest.raises(ValueError, match="other reference answers"):
        pair(a, other)
    with pytest.raises(ValueError, match="twice"):
        pair(a + a[:1], b)
    assert paired_ratio(a, results({"a": [0, 0]}, seed=8)).n == 0  # other seed: nothing to pair


def test_claims_verdicts_and_sentences():
    rng = random.Random(3)
    base = {t: [rng.random() for _ in range(100)] for t in ("a", "b")}
    full = run("full", results({t: [100.0 if d < 0.5 else 0.0 for d in v] for t, v in base.items()}), keep=None)
    same = run("gate", results({t: [100.0 if d < 0.5 else 0.0 for d in v] for t, v in base.items()}))
    weak = run("snapkv", results({t: [100.0 if d < 0.1 else 0.0 for d in v] for t, v in base.items()}))
    keeps = keeps_claim(same, full)
    assert keeps.interval.point == pytest.approx(100.0) and keeps.verdict == "holds"  # identical samples: [100, 100]
    assert keeps.sentence() == "gate keeps 100% [100, 100] of full at 2048 x 1/8 (n=200; >= 90%: holds)"
    assert keeps_claim(weak, full).verdict == "fails"
    beats = beats_claim(same, weak)
    assert beats.verdict == "holds" and beats.interval.lo > 0
    assert beats.sentence().startswith("gate - snapkv at 2048 x 1/8: +")
    assert beats_claim(weak, same).verdict == "fails"
    noisy = run("gate", results({t: coin_scores(100, 0.48, rng) for t in ("a", "b")}))
    assert keeps_claim(noisy, full).verdict == "open"  # independent noise around 96%: 90% is inside the interval
    with pytest.raises(ValueError, match="one context length"):
        keeps_claim(run("gate", same["results"], length=1024), full)
