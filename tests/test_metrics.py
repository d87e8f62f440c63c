"""RULER string-match metrics (trainkv.eval.metrics) on hand-computed cases."""

import pytest

from trainkv.eval.metrics import (
    METRICS,
    per_sample_string_match_all,
    per_sample_string_match_part,
    sample_string_match_all,
    sample_string_match_part,
    score,
    string_match_all,
    string_match_part,
)


def test_all_counts_the_share_of_references_found():
    assert string_match_all(["The numbers are 123 and 456."], [["123", "456"]]) == 100.0
    assert string_match_all(["only 123"], [["123", "456"]]) == 50.0
    assert string_match_all(["nothing"], [["123", "456"]]) == 0.0
    # (3/4 + 1/2) / 2 = 0.625
    assert string_match_all(["a b c", "a"], [["a", "b", "c", "d"], ["a", "z"]]) == 62.5


def test_part_counts_any_reference_found():
    assert string_match_part(["only 123"], [["123", "456"]]) == 100.0
    assert string_match_part(["nothing", "x 456"], [["1"], ["123", "456"]]) == 50.0
    assert string_match_part(["a", "b", "c", "d"], [["a"], ["z"], ["z"], ["z"]]) == 25.0


def test_case_insensitive_substring():
    assert sample_string_match_all("Answer: TENDER-Falcon.", ["tender-falcon"]) == 100.0
    assert sample_string_match_all("tender", ["tender-falcon"]) == 0.0  # the reference must be inside the prediction
    assert sample_string_match_part("ABCDE, FGHIJ", ["fghij", "zzzzz"]) == 100.0


def test_single_string_reference_is_one_reference():
    assert sample_string_match_all("1234567", "1234567") == 100.0
    assert string_match_all(["1234567", "7654321"], ["1234567", "0000000"]) == 50.0


def test_per_sample_scores_average_to_the_aggregate():
    preds = ["a b", "c", "", "d e f"]
    refs = [["a", "b", "x"], ["c"], ["q"], ["d", "z"]]
    per_all = per_sample_string_match_all(preds, refs)
    per_part = per_sample_string_match_part(preds, refs)
    assert per_all == pytest.approx([200 / 3, 100.0, 0.0, 50.0])
    assert per_part == [100.0, 100.0, 0.0, 100.0]
    assert string_match_all(preds, refs) == pytest.approx(sum(per_all) / 4)
    assert string_match_part(preds, refs) == 75.0


def test_matches_kvpress_formula():
    preds = ["The special magic numbers are 1, 2 and 33.", "none", "AbC xyz"]
    refs = [["1", "33", "44"], ["n"], ["abc", "XYZ"]]
    all_ref = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)) / len(preds) * 100
    part_ref = sum(max(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs)) / len(preds) * 100
    assert string_match_all(preds, refs) == pytest.approx(all_ref)
    assert string_match_part(preds, refs) == pytest.approx(part_ref)


def test_score_dispatch_and_errors():
    assert set(METRICS) == {"all", "part"}
    assert score("all", ["x 1"], [["1", "2"]]) == 50.0
    assert score("part", ["x 1"], [["1", "2"]]) == 100.0
    with pytest.raises(ValueError):
        score("bleu", ["x"], [["x"]])
    with pytest.raises(ValueError):
        string_match_all(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        string_match_all([], [])
    with pytest.raises(ValueError):
        sample_string_match_all("a", [])
    with pytest.raises(TypeError):
        string_match_all("a", [["a"]])
