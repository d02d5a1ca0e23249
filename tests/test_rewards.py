"""Rewards on hand-built groups: every rule of docs/method.md (the answer, rewards)."""
import numpy as np
import pytest

from speciarl_jax import rewards
from speciarl_jax.rewards import (
    ABSTAIN,
    GENERIC,
    LESS_SPECIFIC,
    MORE_SPECIFIC,
    PARSE_FAILURE,
    SPECIFIC,
    VERIFIER_ERROR,
    WRONG,
    best_prediction_rewards,
    inject_label_noise,
    normalize_label,
    parse_answer,
    static_rewards,
)


# --- categories --------------------------------------------------------------------------------
def test_category_strings_and_ranks():
    assert rewards.VERDICTS == ("specific", "more specific", "less specific", "generic", "wrong", "abstain")
    assert (PARSE_FAILURE, VERIFIER_ERROR) == ("parse failure", "verifier error")
    assert rewards.RANK[MORE_SPECIFIC] == rewards.RANK[SPECIFIC] == 1
    assert rewards.RANK[SPECIFIC] < rewards.RANK[LESS_SPECIFIC] < rewards.RANK[GENERIC]
    assert rewards.RANK[GENERIC] < rewards.RANK[ABSTAIN] < rewards.RANK[WRONG]


@pytest.mark.parametrize("reply, verdict", [
    ("specific", SPECIFIC), ("  More Specific\n", MORE_SPECIFIC), ('"less_specific"', LESS_SPECIFIC),
    ("generic.", GENERIC), ("WRONG", WRONG), ("abstain", ABSTAIN), ("more-specific", MORE_SPECIFIC),
    ("not specific", None), ("The answer is specific", None), ("", None), (None, None), ("specificity", None),
])
def test_coerce_verdict(reply, verdict):
    assert rewards.coerce_verdict(reply) == verdict


# --- parsing and normalisation -------------------------------------------------------------------
@pytest.mark.parametrize("text, answer", [
    ("<think>a bird</think><answer>Golden-winged Warbler</answer>", "Golden-winged Warbler"),
    ("<answer>\n  Samoyed \n</answer>", "Samoyed"),
    ("<answer>multi\nline</answer>", "multi\nline"),  # the dot matches newlines
    ("<answer>first</answer> then <answer>second</answer>", "first"),
    ("<answer>None</answer>", "None"),
    ("<answer>   </answer>", None),
    ("<answer></answer>", None),
    ("no tags at all", None),
    ("<answer>unclosed", None),
    ("", None),
    (None, None),
])
def test_parse_answer(text, answer):
    assert parse_answer(text) == answer


@pytest.mark.parametrize("raw, normalized", [
    ("Golden-winged Warbler", "golden-winged warbler"),
    ("  Black_footed   Albatross!! ", "black footed albatross"),
    ("F/A-18", "f a-18"),
    ("Boeing 737-200", "boeing 737-200"),
    ("Anna's Hummingbird", "anna s hummingbird"),
    ("Crème Brûlée", "crème brûlée"),
    ("ÉCLAIR", "éclair"),
    ("Golden–winged Warbler", "golden-winged warbler"),  # en dash is a dash
    ("lion\t\n(Panthera leo)", "lion panthera leo"),
    ('"}{<>[]', ""),
    ("", ""),
])
def test_normalize_label(raw, normalized):
    assert normalize_label(raw) == normalized


def test_normalize_label_is_idempotent():
    for text in ["Golden-winged Warbler", "F/A-18", "Crème Brûlée", "a  b", "x_y-z"]:
        once = normalize_label(text)
        assert normalize_label(once) == once


@pytest.mark.parametrize("answer, several", [
    ("robin or cardinal", True), ("robin, cardinal", True), ("a; b", True), ("robin | cardinal", True),
    ("Robin OR Cardinal", True), ("robin\ncardinal", True), ("robin vs cardinal", True),
    ("robin", False), ("Black-and-white Warbler", False), ("fish and chips", False), ("F/A-18", False),
    ("lion,", False), ("Orchid", False), ("oriole", False),
])
def test_has_several_options(answer, several):
    assert rewards.has_several_options(answer) is several


def test_refusals():
    for text in ["None", "I don't know", "unknown", "Not sure.", "N/A"]:
        assert rewards.is_refusal(normalize_label(text)), text
    for text in ["nonesuch", "lion", "known"]:
        assert not rewards.is_refusal(normalize_label(text)), text


# --- the SpeciaRL best-prediction reward ----------------------------------------------------------
def _rewards(categories, mode="all"):
    return best_prediction_rewards(categories, [0] * len(categories), mode=mode).tolist()


def test_best_rank_wins_and_ties_share_in_mode_all():
    assert _rewards([GENERIC, SPECIFIC, LESS_SPECIFIC, SPECIFIC, WRONG]) == [0, 1, 0, 1, 0]


def test_more_specific_ties_with_specific():
    assert _rewards([MORE_SPECIFIC, SPECIFIC, GENERIC]) == [1, 1, 0]


def test_best_is_less_specific_or_generic():
    assert _rewards([LESS_SPECIFIC, GENERIC, WRONG, ABSTAIN]) == [1, 0, 0, 0]
    assert _rewards([GENERIC, GENERIC, WRONG, ABSTAIN]) == [1, 1, 0, 0]


def test_all_wrong_gives_zero():
    assert _rewards([WRONG] * 4) == [0, 0, 0, 0]


def test_all_abstain_is_the_best_the_group_did():
    # Abstaining beats a wrong answer, so when nobody did better, abstentions earn 1.
    assert _rewards([ABSTAIN, ABSTAIN, ABSTAIN]) == [1, 1, 1]
    assert _rewards([ABSTAIN, WRONG, ABSTAIN]) == [1, 0, 1]


def test_parse_failures_get_minus_one_and_never_count_as_best():
    assert _rewards([PARSE_FAILURE, GENERIC, PARSE_FAILURE]) == [-1, 1, -1]
    assert _rewards([PARSE_FAILURE, WRONG]) == [-1, 0]
    assert _rewards([PARSE_FAILURE] * 3) == [-1, -1, -1]


def test_verifier_errors_get_zero_and_never_count_as_best():
    assert _rewards([VERIFIER_ERROR, GENERIC, SPECIFIC]) == [0, 0, 1]
    assert _rewards([VERIFIER_ERROR, VERIFIER_ERROR]) == [0, 0]
    assert _rewards([VERIFIER_ERROR, PARSE_FAILURE, ABSTAIN]) == [0, -1, 1]


def test_single_mode_rewards_only_the_first_best_in_batch_order():
    assert _rewards([GENERIC, SPECIFIC, MORE_SPECIFIC, SPECIFIC], mode="single") == [0, 1, 0, 0]
    assert _rewards([WRONG, WRONG], mode="single") == [0, 0]
    assert _rewards([PARSE_FAILURE, ABSTAIN, ABSTAIN], mode="single") == [-1, 1, 0]


def test_groups_are_scored_independently_and_need_not_be_contiguous():
    categories = [SPECIFIC, GENERIC, GENERIC, WRONG, LESS_SPECIFIC, WRONG]
    groups = ["a", "b", "a", "c", "b", "c"]
    assert best_prediction_rewards(categories, groups).tolist() == [1, 0, 0, 0, 1, 0]
    assert best_prediction_rewards(categories, groups, mode="single").tolist() == [1, 0, 0, 0, 1, 0]
    # Batch order decides `single` even when a group is interleaved with others.
    assert best_prediction_rewards([GENERIC, SPECIFIC, GENERIC], [7, 3, 7], mode="single").tolist() == [1, 1, 0]


def test_paper_sized_batch_matches_a_per_group_loop():
    rng = np.random.default_rng(0)
    all_categories = list(rewards.ALL_CATEGORIES)
    categories = [all_categories[i] for i in rng.integers(0, len(all_categories), 2560)]
    groups = np.repeat(np.arange(256), 10)
    out = best_prediction_rewards(categories, groups)
    assert out.shape == (2560,) and out.dtype == np.float32
    # The rule written out per group: 1 for the group's best rung (specific and more specific share the top;
    # wrong never counts), 0 for the rest, -1 for an unparsed answer, 0 for a verifier error.
    rung = {MORE_SPECIFIC: 0, SPECIFIC: 0, LESS_SPECIFIC: 1, GENERIC: 2, ABSTAIN: 3}
    for g in range(256):
        block = categories[g * 10:(g + 1) * 10]
        ranked = [rung[c] for c in block if c in rung]
        best = min(ranked) if ranked else None
        expected = [-1.0 if c == PARSE_FAILURE else 1.0 if rung.get(c, -1) == best else 0.0 for c in block]
        assert out[g * 10:(g + 1) * 10].tolist() == expected, block


def test_reward_argument_checks():
    with pytest.raises(ValueError, match="mode"):
        best_prediction_rewards([SPECIFIC], [0], mode="best")
    with pytest.raises(ValueError, match="length"):
        best_prediction_rewards([SPECIFIC, WRONG], [0])
    with pytest.raises(ValueError, match="unknown category 'correct'"):
        best_prediction_rewards(["correct"], [0])
    assert best_prediction_rewards([], []).shape == (0,)


# --- static tables ---------------------------------------------------------------------------------
ORDER = [MORE_SPECIFIC, SPECIFIC, LESS_SPECIFIC, GENERIC, ABSTAIN, WRONG, PARSE_FAILURE, VERIFIER_ERROR]


@pytest.mark.parametrize("table, expected", [
    ("reward3", [1, 1, 0, 0, 0, 0, -1, 0]),
    ("scala1", [1, 1, 0.75, 0.5, 0.25, 0, -1, 0]),
    ("scala2", [1, 1, 0.75, 0.5, 0, 0, -1, 0]),
    ("scala3", [1, 1, 0.75, 0, 0, 0, -1, 0]),
])
def test_static_tables(table, expected):
    out = static_rewards(ORDER, table)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array(expected, dtype=np.float32))


def test_static_rewards_ignore_the_group():
    # Unlike SpeciaRL, a generic answer earns the same whatever the other rollouts did.
    assert static_rewards([GENERIC, SPECIFIC], "scala1").tolist() == [0.5, 1.0]
    assert static_rewards([GENERIC, GENERIC], "scala1").tolist() == [0.5, 0.5]


def test_static_rewards_reject_unknown_tables_and_accept_custom_ones():
    with pytest.raises(ValueError, match="scala1"):
        static_rewards([SPECIFIC], "scala9")
    custom = {c: float(i) for i, c in enumerate(rewards.ALL_CATEGORIES)}
    assert static_rewards([WRONG], custom).tolist() == [custom[WRONG]]
    with pytest.raises(ValueError, match="lacks"):
        static_rewards([WRONG], {WRONG: 0.0})


# --- label noise -------------------------------------------------------------------------------------
def test_noise_off_and_no_verdict_rollouts_are_untouched():
    categories = [SPECIFIC, WRONG, GENERIC, PARSE_FAILURE, VERIFIER_ERROR]
    assert inject_label_noise(categories, 0.0, rng=1) == categories
    noisy = inject_label_noise([PARSE_FAILURE, VERIFIER_ERROR] * 50, 1.0, rng=1)
    assert noisy == [PARSE_FAILURE, VERIFIER_ERROR] * 50


def test_noise_with_p_one_moves_every_verdict_exactly_one_rung():
    assert inject_label_noise([SPECIFIC] * 20, 1.0, rng=0) == [LESS_SPECIFIC] * 20
    assert inject_label_noise([MORE_SPECIFIC] * 20, 1.0, rng=0) == [LESS_SPECIFIC] * 20
    assert inject_label_noise([WRONG] * 20, 1.0, rng=0) == [ABSTAIN] * 20
    assert set(inject_label_noise([LESS_SPECIFIC] * 200, 1.0, rng=0)) == {SPECIFIC, GENERIC}
    assert set(inject_label_noise([GENERIC] * 200, 1.0, rng=0)) == {LESS_SPECIFIC, ABSTAIN}
    assert set(inject_label_noise([ABSTAIN] * 200, 1.0, rng=0)) == {GENERIC, WRONG}


def test_noise_is_reproducible_with_a_seed_and_leaves_the_input_alone():
    categories = [SPECIFIC, LESS_SPECIFIC, GENERIC, ABSTAIN, WRONG] * 100
    before = list(categories)
    a = inject_label_noise(categories, 0.25, rng=123)
    b = inject_label_noise(categories, 0.25, rng=np.random.default_rng(123))
    c = inject_label_noise(categories, 0.25, rng=124)
    assert a == b and a != c and categories == before


@pytest.mark.parametrize("p", [0.05, 0.10, 0.25])
def test_noise_statistics(p):
    n = 40_000
    rung = {c: i for i, c in enumerate(rewards.LADDER)}
    for start in [SPECIFIC, GENERIC, WRONG]:
        noisy = inject_label_noise([start] * n, p, rng=7)
        steps = np.array([rung[c] - rung[start] for c in noisy])
        assert set(np.unique(steps)) <= {-1, 0, 1}
        moved = np.mean(steps != 0)
        tolerance = 4 * np.sqrt(p * (1 - p) / n)  # four standard errors
        assert abs(moved - p) < tolerance, (start, moved)
        if start == GENERIC:  # interior rung: up and down equally often
            down = np.sum(steps == 1) / max(1, np.sum(steps != 0))
            assert abs(down - 0.5) < 4 * np.sqrt(0.25 / (p * n))


def test_noise_rejects_a_bad_probability():
    with pytest.raises(ValueError, match="probability"):
        inject_label_noise([SPECIFIC], 1.5)
