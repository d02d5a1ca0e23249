"""Advantages, loss aggregation, the clipped policy loss, KL estimators, DAPO shaping and dynamic sampling,
each checked against values worked out by hand."""

import math
import types

import numpy as np
import pytest

from speciarl_jax.rl import advantages, dapo, losses, update

# ---- advantages ----


def test_grpo_advantages_by_hand():
    # Groups interleaved on purpose: "a" = [1, 0, 0], "b" = [0.5] alone, "c" = [1, 1] all equal.
    rewards = [1.0, 0.5, 0.0, 1.0, 0.0, 1.0]
    groups = ["a", "b", "a", "c", "a", "c"]
    std_a = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased: divide by n - 1 = 2
    high, low = (2 / 3) / (std_a + 1e-6), (-1 / 3) / (std_a + 1e-6)
    expected = [high, 0.5 / (1 + 1e-6), low, 0.0, low, 0.0]
    got = advantages.group_advantages(rewards, groups, normalize_std=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32


def test_drgrpo_advantages_have_no_std():
    rewards = np.array([1.0, 0.5, 0.0, 1.0, 0.0, 1.0])
    groups = np.array([7, 3, 7, 9, 7, 9])
    got = advantages.group_advantages(rewards, groups, normalize_std=False)
    np.testing.assert_allclose(got, [2 / 3, 0.5, -1 / 3, 0.0, -1 / 3, 0.0], rtol=1e-6)


def test_group_of_one_keeps_its_reward_and_equal_rewards_give_zero():
    np.testing.assert_allclose(advantages.group_advantages([-1.0], [0], True), [-1.0], rtol=1e-5)
    np.testing.assert_allclose(advantages.group_advantages([-1.0], [0], False), [-1.0])
    np.testing.assert_array_equal(advantages.group_advantages([0.3] * 4, [1] * 4, True), np.zeros(4))


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="must both be"):
        advantages.group_advantages([1.0, 2.0], [0], True)
    with pytest.raises(ValueError, match="non-finite"):
        advantages.group_advantages([1.0, np.nan], [0, 0], True)
    assert advantages.group_advantages([], [], True).shape == (0,)


# ---- aggregation ----

VALUES = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last row is empty (a padding row)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-sum", 3.5),  # mean(3, 4) over the two non-empty rows
        ("seq-mean-token-mean", 2.75),  # mean(1.5, 4)
        ("seq-mean-token-sum-norm", 7 / 4),  # 7 / max_len
    ],
)
def test_aggregation_modes_by_hand(mode, expected):
    assert float(losses.aggregate(VALUES, MASK, mode, max_len=4)) == pytest.approx(expected)
    assert float(losses.aggregate(VALUES, np.zeros_like(MASK), mode, max_len=4)) == 0.0


def test_aggregation_errors():
    with pytest.raises(ValueError, match="Unknown loss aggregation mode"):
        losses.aggregate(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match="needs max_len"):
        losses.aggregate(VALUES, MASK, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_micro_batch_shares_rebuild_the_whole_batch(mode):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 5))
    mask = (rng.random((6, 5)) < 0.6).astype(np.float32)
    mask[2] = 0
    whole = float(losses.aggregate(values, mask, mode))
    tokens, rows = mask.sum(), float((mask.sum(1) > 0).sum())
    parts = [(values[i : i + 2], mask[i : i + 2]) for i in range(0, 6, 2)]
    rebuilt = sum(float(losses.aggregation_share(m, tokens, rows, 3, mode) * losses.aggregate(v, m, mode))
                  for v, m in parts)
    assert rebuilt == pytest.approx(whole, rel=1e-6)


def test_sum_norm_share_averages_micro_batches():
    # The reference implementation normalises each micro-batch by max_len and averages over micro-batches.
    assert float(losses.aggregation_share(MASK, 3.0, 2.0, 4, "seq-mean-token-sum-norm")) == 0.25


# ---- policy loss ----


def test_clipped_policy_loss_by_hand():
    eps_low, eps_high, c = 0.2, 0.28, 3.0
    ratios = np.array([[1.5, 1.5, 5.0, 0.5, 0.5, 1.0]])
    adv = np.array([[1.0, -1.0, -1.0, 1.0, -1.0, 0.0]])
    old = np.zeros_like(ratios)
    logp = np.log(ratios)
    mask = np.ones_like(ratios)
    # per token: max(-A r, -A clip(r, 0.8, 1.28)), then min(., -A c) where A < 0
    expected = np.array([-1.28, 1.5, 3.0, -0.5, 0.8, 0.0])
    loss, metrics = losses.policy_loss(logp, old, adv, mask, eps_low, eps_high, c, "token-mean")
    assert float(loss) == pytest.approx(expected.mean(), rel=1e-5)
    # The clipped branch wins on token 0 (A > 0, r > 1 + eps_high) and token 4 (A < 0, r < 1 - eps_low);
    # the dual clip caps token 2 (A < 0, r = 5 > c).
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(metrics["dual_clip_fraction"]) == pytest.approx(1 / 6)
    assert float(metrics["approx_kl"]) == pytest.approx(-np.log(ratios).mean(), rel=1e-5)
    loss_no_dual, _ = losses.policy_loss(logp, old, adv, mask, eps_low, eps_high, None, "token-mean")
    assert float(loss_no_dual) == pytest.approx((expected.sum() - 3.0 + 5.0) / 6, rel=1e-5)


def test_policy_loss_per_row_advantages_masks_and_ratio_bound():
    logp = np.array([[0.0, 50.0, -1.0], [0.0, 0.0, 0.0]])  # log-ratio 50 is clipped to 20 before exp
    old = np.zeros_like(logp)
    mask = np.array([[1, 1, 0], [0, 0, 0]])  # an empty second row
    loss, metrics = losses.policy_loss(logp, old, np.array([-2.0, 5.0]), mask, 0.2, 0.2, 3.0, "seq-mean-token-sum")
    # row 0: token 0 ratio 1 -> 2.0; token 1 ratio e^20 -> dual clip 2 * 3 = 6; masked token ignored
    assert float(loss) == pytest.approx(8.0)
    assert np.isfinite(float(metrics["ratio_mean"]))
    per_token = np.array([[-2.0] * 3, [5.0] * 3])
    same, _ = losses.policy_loss(logp, old, per_token, mask, 0.2, 0.2, 3.0, "seq-mean-token-sum")
    assert float(same) == float(loss)


def test_on_policy_gradient_direction():
    import jax

    # At ratio 1 the gradient of the loss w.r.t. logp is -A / tokens: raise good tokens, lower bad ones.
    adv = np.array([1.0, -1.0])
    grad = jax.grad(lambda lp: losses.policy_loss(lp, np.zeros((2, 2)), adv, np.ones((2, 2)), 0.2, 0.2, 3.0,
                                                  "token-mean")[0])(np.zeros((2, 2)))
    np.testing.assert_allclose(grad, [[-0.25, -0.25], [0.25, 0.25]])


def test_dual_clip_constant_must_exceed_one():
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        losses.policy_loss(np.zeros((1, 1)), np.zeros((1, 1)), np.ones(1), np.ones((1, 1)), 0.2, 0.2, 1.0, "token-mean")


# ---- KL ----


def test_kl_estimators_by_hand():
    logp, ref = np.array([[-1.0]]), np.array([[-2.0]])
    assert float(losses.kl_penalty(logp, ref, "kl")[0, 0]) == pytest.approx(1.0)
    assert float(losses.kl_penalty(ref, logp, "abs")[0, 0]) == pytest.approx(1.0)
    assert float(losses.kl_penalty(logp, ref, "mse")[0, 0]) == pytest.approx(0.5)
    # k3 with d = ref - logp = -1: e^-1 + 1 - 1
    assert float(losses.kl_penalty(logp, ref, "low_var_kl")[0, 0]) == pytest.approx(math.exp(-1.0))
    assert float(losses.kl_penalty(logp, ref, "k3")[0, 0]) == pytest.approx(math.exp(-1.0))
    # Far from the reference the estimate is capped at 10; equal policies give 0.
    assert float(losses.kl_penalty(np.array([[-40.0]]), np.array([[-1.0]]), "low_var_kl")[0, 0]) == 10.0
    assert float(losses.kl_penalty(logp, logp, "low_var_kl")[0, 0]) == 0.0
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        losses.kl_penalty(logp, ref, "k9")


# ---- DAPO ----


def test_overlong_penalty_by_hand():
    got = dapo.overlong_penalty([100, 1536, 1792, 2048], max_len=2048, buffer=512)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -1.0])
    np.testing.assert_allclose(dapo.overlong_penalty([1792], 2048, 512, factor=0.5), [-0.25])
    with pytest.raises(ValueError, match="overlong buffer"):
        dapo.overlong_penalty([1], max_len=10, buffer=0)


def test_informative_groups_drop_equal_rewards():
    keep = dapo.informative_groups([1, 1, 0, 1, 0.5, 0.5, 2], [0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(keep, [False, False, True, True, False, False, False])


class _Batch(types.SimpleNamespace):
    """A generation batch as dynamic sampling sees it: raw rewards (`scores`) of whole groups, rows prompt-major."""


def _generation_batch(rewards_per_group, tag):
    scores = np.asarray(rewards_per_group, np.float32).reshape(-1)
    return _Batch(scores=scores, tokens=np.stack([np.full(3, 10 * tag + i) for i in range(len(scores))]))


def _select(batch, groups, samples=2):
    rows = np.concatenate([np.arange(g * samples, (g + 1) * samples) for g in groups])
    return _Batch(scores=batch.scores[rows], tokens=batch.tokens[rows])


def test_dynamic_sampling_fills_the_batch_across_generation_batches():
    batches = [
        _generation_batch([[1, 1], [0, 1], [0, 0]], 0),  # one informative group
        _generation_batch([[1, 1], [1, 1], [1, 1]], 1),  # none
        _generation_batch([[1, 0], [0, 1], [0.5, 1]], 2),  # three, two of them needed
    ]
    calls = []

    def draw(i):
        calls.append(i)
        return batches[i]

    pieces, counts = dapo.collect_informative(draw, 3, num_samples=2, max_generation_batches=5, select=_select)
    assert calls == [0, 1, 2]
    assert counts == {"dapo/generation_batches": 3, "dapo/generated_groups": 9, "dapo/dropped_groups": 5}
    np.testing.assert_array_equal(np.concatenate([p.scores for p in pieces]), [0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(np.concatenate([p.tokens for p in pieces])[:, 0], [2, 3, 20, 21, 22, 23])


def test_dynamic_sampling_gives_up_with_a_clear_error():
    with pytest.raises(dapo.DynamicSamplingError, match=r"gathered 0 of 2 groups .* in 10 generation batches"):
        dapo.collect_informative(lambda i: _generation_batch([[1, 1], [0, 0]], i), 2, num_samples=2,
                                 max_generation_batches=10, select=_select)
    with pytest.raises(ValueError, match="groups_wanted"):
        dapo.collect_informative(lambda i: _generation_batch([[1, 0]], i), 0, num_samples=2,
                                 max_generation_batches=10, select=_select)


# ---- configuration ----


def test_presets_follow_the_spec():
    grpo, drgrpo, dapo_cfg = update.preset("grpo"), update.preset("drgrpo"), update.preset("dapo")
    assert (grpo.normalize_std, grpo.loss_agg_mode, grpo.kl_coef) == (True, "token-mean", 0.01)
    assert grpo.kl_kind == "low_var_kl"
    assert (grpo.eps_low, grpo.eps_high, grpo.clip_c) == (0.2, 0.2, 3.0)
    assert (drgrpo.normalize_std, drgrpo.loss_agg_mode, drgrpo.kl_coef) == (False, "seq-mean-token-sum-norm", 0.0)
    assert (dapo_cfg.eps_low, dapo_cfg.eps_high, dapo_cfg.clip_c, dapo_cfg.kl_coef) == (0.2, 0.28, 10.0, 0.0)
    assert dapo_cfg.dynamic_sampling and dapo_cfg.overlong_buffer == 512 and dapo_cfg.max_generation_batches == 10
    assert (grpo.learning_rate, grpo.weight_decay, grpo.max_grad_norm) == (3e-5, 0.01, 1.0)
    assert update.preset("dapo", eps_high=0.3).eps_high == 0.3


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="Unknown algorithm 'ppo'"):
        update.preset("ppo")
    with pytest.raises(ValueError, match=r"no field\(s\) \['lr'\]"):
        update.preset("grpo", lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        update.RLConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        update.RLConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        update.RLConfig(kl_kind="nope")


def test_learning_rate_schedules():
    warm = update.learning_rate_schedule(update.RLConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="linear",
                                                         total_steps=8))
    assert [float(warm(s)) for s in (0, 2, 4, 6, 8)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert float(update.learning_rate_schedule(update.RLConfig(learning_rate=3e-5))(100)) == pytest.approx(3e-5)
