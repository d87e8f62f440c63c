"""Bootstrap intervals and paired claims (trainkv.eval.intervals) on hand-made run files."""

from __future__ import annotations

import random

import pytest

from trainkv.eval.intervals import (
    beats_claim, cell_interval, keeps_claim, length_claim, pair, paired_difference, paired_ratio, resample_indices,
    share_ratio, unpaired_difference, unpaired_ratio,
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


def test_length_claim_divides_the_two_shares_and_resamples_each_length_on_its_own():
    rng = random.Random(5)
    def cell(label, length, p_by_task, keep=0.125):
        return run(label, results({t: [100.0 if rng.random() < p else 0.0 for _ in range(60)]
                                   for t, p in p_by_task.items()}, seed=length), length=length, keep=keep)
    short_full, short = cell("full", 8192, {"a": 0.8, "b": 0.6}, None), cell("gate", 8192, {"a": 0.8, "b": 0.5})
    long_full, long = cell("full", 32768, {"a": 0.7, "b": 0.5}, None), cell("gate", 32768, {"a": 0.6, "b": 0.3})

    def share(rec, full):
        return sum(r["score"] for r in rec["results"]) / sum(r["score"] for r in full["results"])
    claim = length_claim(long, long_full, short, short_full)
    assert claim.interval.point == pytest.approx(100 * share(long, long_full) / share(short, short_full))
    assert claim.interval.lo < claim.interval.point < claim.interval.hi and claim.interval.n == 120
    assert claim.kind == "holds" and claim.cell == "32768 x 1/8" and claim.other == "8192 x 1/8"
    assert claim.verdict == ("fails" if claim.interval.hi < 85 else "holds" if claim.interval.lo >= 85 else "open")
    assert claim.sentence().startswith("gate's share of the full cache at 32768 x 1/8 is ")
    assert "of its share at 8192 x 1/8 (n=120 per length; >= 85%:" in claim.sentence()
    # the same method at both lengths with identical per-sample outcomes: exactly 100%, whatever the resamples
    same = length_claim(run("gate", short["results"], length=32768), run("full", short_full["results"], 32768, None),
                        short, short_full)
    assert (same.interval.point, same.verdict) == (pytest.approx(100.0), "open" if same.interval.lo < 85 else "holds")
    # independent draws per length: the interval is wider than that of the long cell's share alone
    alone = paired_ratio(long["results"], long_full["results"])
    ratio = share_ratio(long["results"], long_full["results"], short["results"], short_full["results"])
    assert (ratio.hi - ratio.lo) > (alone.hi - alone.lo) * 100 / (100 * share(short, short_full)) * 0.99
    with pytest.raises(ValueError, match="one method at two lengths"):
        length_claim(long, long_full, run("other", short["results"], length=8192), short_full)
    with pytest.raises(ValueError, match="one context length"):
        length_claim(long, short_full, short, short_full)


def test_the_report_adds_length_claims_for_trained_methods_only():
    from trainkv.eval.report import markdown, summarize

    rng = random.Random(9)
    def cell(label, length, p, keep=0.125, checkpoint=None):
        rec = run(label, results({t: [100.0 if rng.random() < p else 0.0 for _ in range(40)] for t in "ab"},
                                 seed=length), length=length, keep=keep)
        rec["config"]["budget"].update(label="full" if keep is None else f"r{keep:g}", keep_ratio=keep)
        rec["config"]["method"]["checkpoint"] = checkpoint
        for r in rec["results"]:
            r["compression"] = keep or 1.0
        return rec
    recs = [cell("full", n, 0.7, None) for n in (8192, 16384, 32768)]
    recs += [cell("gate", n, 0.65, checkpoint="ckpt") for n in (8192, 16384, 32768)]
    recs += [cell("snapkv", n, 0.2) for n in (8192, 32768)]  # training-free: no length claim
    summary = summarize(recs)
    lengths = [c for c in summary["claims"] if c["kind"] == "holds"]
    assert [(c["method"], c["other"], c["cell"]) for c in lengths] == [
        ("gate", "8192 x 1/8", "16384 x 1/8"), ("gate", "8192 x 1/8", "32768 x 1/8")]
    text = markdown(summary)
    assert "Length generalization" in text and "gate's share of the full cache at 32768 x 1/8 is" in text
    assert "snapkv's share" not in text
