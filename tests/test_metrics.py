"""Evaluation metrics on hand-built category lists: the formulas of docs/method.md, corner cases, Best-of-N
selection and ties, pooling, and the bootstrap intervals checked against resampling images directly."""

import math

import numpy as np
import pytest

from speciarl_jax import metrics
from speciarl_jax.rewards import categories as cat

MIXED = (
    [cat.SPECIFIC] * 3 + [cat.MORE_SPECIFIC] + [cat.LESS_SPECIFIC] * 2 + [cat.GENERIC, cat.WRONG, cat.ABSTAIN]
    + [cat.PARSE_FAILURE]
)


def test_formulas_on_a_hand_built_list():
    m = metrics.summarize(MIXED, bootstrap=0)
    assert m.n == 10 and m.verifier_errors == 0
    assert m.correctness == pytest.approx(7 / 10)
    assert m.specificity == pytest.approx(4 / 7)
    assert m.hm == pytest.approx(2 * 0.7 * (4 / 7) / (0.7 + 4 / 7))
    assert m.score == pytest.approx((4 * 1.0 + 2 * 0.6 + 0.2 + 0.0 - 1.0 - 1.0) / 10)
    shares = m.shares()
    assert shares[cat.SPECIFIC] == pytest.approx(0.3) and shares[cat.PARSE_FAILURE] == pytest.approx(0.1)
    assert sum(shares.values()) == pytest.approx(1.0) and shares[cat.VERIFIER_ERROR] == 0
    assert m.intervals == {}
    row = m.to_dict()
    assert row["n"] == 10 and row["count/wrong"] == 1 and row["share/generic"] == pytest.approx(0.1)
    assert "correctness_low" not in row


def test_verifier_errors_count_in_n_as_in_the_original_evaluator():
    """Answers the verifier failed on are in the denominator (neither correct nor wrong, score 0), and counted."""
    m = metrics.summarize(MIXED + [cat.VERIFIER_ERROR] * 5, bootstrap=200)
    assert m.n == 15 and m.verifier_errors == 5
    assert m.correctness == pytest.approx(7 / 15) and m.specificity == pytest.approx(4 / 7)
    assert m.score == pytest.approx((4 * 1.0 + 2 * 0.6 + 0.2 + 0.0 - 1.0 - 1.0) / 15)
    assert m.to_dict()["verifier_errors"] == 5 and m.shares()[cat.VERIFIER_ERROR] == pytest.approx(5 / 15)


def test_corner_cases():
    none_correct = metrics.summarize([cat.WRONG, cat.ABSTAIN, cat.PARSE_FAILURE], bootstrap=100)
    assert none_correct.correctness == 0 and none_correct.specificity == 0 and none_correct.hm == 0
    assert none_correct.score == pytest.approx(-2 / 3)
    assert none_correct.intervals["hm"] == (0.0, 0.0)
    perfect = metrics.summarize([cat.MORE_SPECIFIC, cat.SPECIFIC] * 4, bootstrap=100)
    assert (perfect.correctness, perfect.specificity, perfect.hm, perfect.score) == (1, 1, 1, 1)
    assert perfect.intervals["correctness"] == (1.0, 1.0)
    only_generic = metrics.summarize([cat.GENERIC] * 3, bootstrap=0)
    assert only_generic.correctness == 1 and only_generic.specificity == 0 and only_generic.hm == 0
    empty = metrics.summarize([], bootstrap=100)
    assert empty.n == 0
    assert all(math.isnan(getattr(empty, k)) for k in metrics.HEADLINE)
    assert all(math.isnan(v) for bounds in empty.intervals.values() for v in bounds)
    assert all(math.isnan(v) for v in empty.shares().values())
    with pytest.raises(ValueError, match="unknown category 'correct'"):
        metrics.summarize(["correct"])
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        metrics.summarize(MIXED, bootstrap=-1)
    with pytest.raises(ValueError, match="confidence level"):
        metrics.summarize(MIXED, level=95)


def test_metrics_from_counts_is_vectorised():
    counts = np.stack([metrics.count_categories(MIXED), metrics.count_categories([cat.WRONG])])
    values = metrics.metrics_from_counts(counts[None])
    assert values["correctness"].shape == (1, 2)
    np.testing.assert_allclose(values["correctness"][0], [0.7, 0.0])


@pytest.mark.parametrize(
    "samples, expected",
    [
        ([cat.GENERIC, cat.MORE_SPECIFIC, cat.SPECIFIC], (cat.MORE_SPECIFIC, 1)),
        ([cat.SPECIFIC, cat.MORE_SPECIFIC], (cat.MORE_SPECIFIC, 1)),  # the original ranks the finer answer first
        ([cat.SPECIFIC, cat.GENERIC, cat.SPECIFIC], (cat.SPECIFIC, 0)),  # a tie: the first sampled
        ([cat.WRONG, cat.ABSTAIN, cat.WRONG], (cat.ABSTAIN, 1)),
        ([cat.PARSE_FAILURE, cat.WRONG], (cat.WRONG, 1)),
        ([cat.VERIFIER_ERROR, cat.PARSE_FAILURE], (cat.PARSE_FAILURE, 1)),
        ([cat.VERIFIER_ERROR, cat.VERIFIER_ERROR], (cat.VERIFIER_ERROR, 0)),
        ([cat.LESS_SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC], (cat.LESS_SPECIFIC, 0)),
        ([cat.WRONG], (cat.WRONG, 0)),
    ],
)
def test_best_of_n_picks_by_rank_and_breaks_ties_by_order(samples, expected):
    assert metrics.best_of_n(samples) == expected


def test_selection_modes_and_errors():
    per_image = [[cat.WRONG, cat.SPECIFIC], [cat.PARSE_FAILURE, cat.GENERIC], [cat.ABSTAIN, cat.ABSTAIN]]
    assert metrics.select(per_image, "first") == [cat.WRONG, cat.PARSE_FAILURE, cat.ABSTAIN]
    assert metrics.select(per_image, "best") == [cat.SPECIFIC, cat.GENERIC, cat.ABSTAIN]
    assert metrics.select([], "best") == []
    with pytest.raises(ValueError, match="at least one"):
        metrics.best_of_n([])
    with pytest.raises(ValueError, match="without any sampled answer"):
        metrics.select([[]], "first")
    with pytest.raises(ValueError, match="'first' or 'best'"):
        metrics.select(per_image, "vote")
    with pytest.raises(ValueError, match="unknown category"):
        metrics.best_of_n([cat.WRONG, "great"])


def test_overall_pools_answers_and_mean_averages_data_sets():
    per = {"a": [cat.SPECIFIC] * 9 + [cat.WRONG], "b": [cat.GENERIC, cat.WRONG], "empty": []}
    out = metrics.summarize_many(per, bootstrap=300, seed=1)
    assert set(out) == {"a", "b", "empty", "overall", "mean"}
    assert out["overall"].n == 12
    assert out["overall"].correctness == pytest.approx(10 / 12)
    assert out["overall"].specificity == pytest.approx(9 / 10)
    assert out["mean"].correctness == pytest.approx((0.9 + 0.5) / 2)  # the empty set is left out
    assert out["mean"].specificity == pytest.approx((1.0 + 0.0) / 2)
    assert out["mean"].hm == pytest.approx((out["a"].hm + out["b"].hm) / 2)
    assert out["mean"].shares()[cat.WRONG] == pytest.approx((0.1 + 0.5) / 2)
    assert math.isnan(out["empty"].correctness)
    for name in ("a", "b", "overall", "mean"):
        for key in metrics.WITH_INTERVALS:
            low, high = out[name].intervals[key]
            assert low <= getattr(out[name], key) + 1e-12 and getattr(out[name], key) <= high + 1e-12
    assert metrics.summarize_many({}) == {}
    with pytest.raises(ValueError, match="reserved"):
        metrics.summarize_many({"overall": [cat.WRONG]})


def test_bootstrap_matches_resampling_images():
    rng = np.random.default_rng(3)
    pool = [cat.SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.WRONG, cat.ABSTAIN, cat.PARSE_FAILURE]
    answers = list(rng.choice(pool, size=200, p=[0.35, 0.2, 0.1, 0.2, 0.1, 0.05]))
    fast = metrics.summarize(answers, bootstrap=4000, seed=0)
    # The slow way: resample the list of images with replacement and recompute.
    codes = metrics.count_categories
    replicates = {k: [] for k in metrics.WITH_INTERVALS}
    array = np.array(answers)
    for _ in range(4000):
        values = metrics.metrics_from_counts(codes(array[rng.integers(0, len(array), len(array))]))
        for k in replicates:
            replicates[k].append(float(values[k]))
    for k in metrics.WITH_INTERVALS:
        slow = np.percentile(replicates[k], [2.5, 97.5])
        np.testing.assert_allclose(fast.intervals[k], slow, atol=0.007)  # 0.005 measured; a 92% one: 0.013
    # The same seed gives the same intervals; more images give narrower ones.
    assert metrics.summarize(answers, bootstrap=500, seed=7).intervals == metrics.summarize(
        answers, bootstrap=500, seed=7).intervals
    wide = metrics.summarize(answers[:50], bootstrap=2000).intervals["correctness"]
    narrow = metrics.summarize(answers * 8, bootstrap=2000).intervals["correctness"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_specificity_both_ways_by_hand():
    """2 specific, 1 more specific, 1 less specific, 1 wrong, 1 parse failure: C = 4/6; S = 3/4 among correct
    answers, S_all = 3/6 among all; HM = 2CS/(C+S) of each pair."""
    answers = ["specific", "specific", "more specific", "less specific", "wrong", "parse failure"]
    m = metrics.summarize(answers, bootstrap=200)
    c, s, s_all = 4 / 6, 3 / 4, 3 / 6
    assert (m.correctness, m.specificity, m.specificity_all) == pytest.approx((c, s, s_all))
    assert m.hm == pytest.approx(2 * c * s / (c + s)) and m.hm_all == pytest.approx(2 * c * s_all / (c + s_all))
    record = m.to_dict()
    assert record["specificity_all_low"] <= s_all <= record["specificity_all_high"]
    assert metrics.summarize(["wrong", "abstain"], bootstrap=0).hm_all == 0.0
