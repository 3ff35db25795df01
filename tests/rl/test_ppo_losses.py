"""PPO surrogate and value clipping by gradient, aggregation, entropy, DPO and ORPO."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import ppo_losses as L

ONE = jnp.ones((1, 1))


def policy_grad(ratio, advantage, clip_eps=0.2, clip_eps_high=None):
    """d loss / d logprob for a single token with old logprob 0 and the given ratio."""

    def loss(logp):
        value, _ = L.ppo_policy_loss(
            logp, jnp.zeros((1, 1)), advantage * ONE, ONE, clip_eps, clip_eps_high
        )
        return value

    return float(jax.grad(loss)(jnp.log(ratio) * ONE)[0, 0])


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.19, 1.0, False),  # just inside 1 + eps
        (1.21, 1.0, True),  # just outside: the gain is capped
        (0.79, 1.0, False),  # below 1 - eps with A > 0 is never clipped
        (0.81, -1.0, False),
        (0.79, -1.0, True),
        (1.21, -1.0, False),  # above 1 + eps with A < 0 is never clipped
    ],
)
def test_policy_gradient_is_zero_exactly_where_clipped(ratio, advantage, clipped):
    grad = policy_grad(ratio, advantage)
    if clipped:
        assert grad == 0.0
    else:
        # d(-r A)/d log r = -r A.
        np.testing.assert_allclose(grad, -ratio * advantage, rtol=1e-5)


def test_clip_higher_moves_only_the_upper_edge():
    assert policy_grad(1.25, 1.0, 0.2, 0.28) != 0.0
    assert policy_grad(1.29, 1.0, 0.2, 0.28) == 0.0
    assert policy_grad(0.79, -1.0, 0.2, 0.28) == 0.0
    assert policy_grad(0.81, -1.0, 0.2, 0.28) != 0.0


def test_policy_loss_metrics_and_token_mean_aggregation():
    ratios = jnp.array([[1.0, 1.5, 0.5, 0.6, 7.0]])
    adv_bxt = jnp.array([[2.0, 1.0, -1.0, 1.0, 3.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the wild last token is padding
    loss, m = L.ppo_policy_loss(jnp.log(ratios), jnp.zeros((1, 5)), adv_bxt, mask, 0.2)
    # Per token: -min(rA, clip(r)A) = -2, -1.2, +0.8, -0.6; mean over 4 valid tokens.
    np.testing.assert_allclose(loss, (-2.0 - 1.2 + 0.8 - 0.6) / 4, rtol=1e-6)
    # Tokens 1 and 2 are clipped; token 3 is below 1 - eps but with A > 0, so it is not.
    np.testing.assert_allclose(m["clip_fraction"], 2 / 4, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], 0.9, rtol=1e-6)
    k3 = [r - 1 - math.log(r) for r in (1.0, 1.5, 0.5, 0.6)]
    np.testing.assert_allclose(m["approx_kl"], sum(k3) / 4, rtol=1e-5)


def test_aggregations_weigh_tokens_differently():
    loss_bxt = jnp.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 0.0]])
    mask = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(L.aggregate(loss_bxt, mask, "token_mean"), 7 / 4)
    np.testing.assert_allclose(L.aggregate(loss_bxt, mask, "sequence_mean"), 1.5)
    np.testing.assert_allclose(L.aggregate(loss_bxt, mask, "constant"), 7 / 8)
    with pytest.raises(ValueError, match="token_mean"):
        L.aggregate(loss_bxt, mask, "mean")


def test_old_logprobs_and_advantages_get_no_gradient():
    def loss(old, a):
        return L.ppo_policy_loss(jnp.full((1, 2), -0.1), old, a, jnp.ones((1, 2)), 0.2)[0]

    g_old, g_adv = jax.grad(loss, argnums=(0, 1))(jnp.zeros((1, 2)), jnp.ones((1, 2)))
    assert not np.any(g_old) and not np.any(g_adv)


@pytest.mark.parametrize(
    "value, ret, want_grad",
    [
        (0.5, 1.0, 0.0),  # moved 0.5 from old=0: clipped error 0.64 > 0.25 binds, no gradient
        (0.1, 1.0, -0.9),  # inside the clip range: both errors agree
        (-0.5, 1.0, -1.5),  # moved away from the return: the unclipped error binds
        (0.5, 0.0, 0.5),
    ],
)
def test_value_loss_clipping_gradient(value, ret, want_grad):
    def loss(v):
        return L.value_loss(v * ONE, jnp.zeros((1, 1)), ret * ONE, ONE, 0.2)[0]

    np.testing.assert_allclose(jax.grad(loss)(jnp.float32(value)), want_grad, atol=1e-6)


def test_value_loss_value_and_explained_variance():
    returns = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, m = L.value_loss(returns, returns, returns, mask, 0.2)
    assert float(loss) == 0.0 and float(m["explained_variance"]) == pytest.approx(1.0)
    _, m = L.value_loss(jnp.full((1, 4), 2.0), jnp.full((1, 4), 2.0), returns, mask, 0.2)
    assert float(m["explained_variance"]) == pytest.approx(0.0, abs=1e-6)
    loss, m = L.value_loss(jnp.full((1, 4), 0.5), jnp.zeros((1, 4)), returns, mask, 0.2)
    # v_clip = 0.2: errors max(0.25, 0.64), max(2.25, 3.24), max(6.25, 7.84).
    np.testing.assert_allclose(loss, 0.5 * (0.64 + 3.24 + 7.84) / 3, rtol=1e-5)
    np.testing.assert_allclose(m["value_clip_fraction"], 1.0)


def test_entropy_from_logits():
    v = 5
    logits = jnp.stack([jnp.zeros(v), jnp.array([50.0, 0, 0, 0, 0]), jnp.arange(v) * 1.0])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    got = L.entropy_from_logits(logits[None], mask)
    # Uniform has log V nats, a near one-hot has ~0; the third position is padding.
    np.testing.assert_allclose(got, math.log(v) / 2, rtol=1e-5)


def test_token_and_sequence_logprobs():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[1, 6, 0], [3, 3, 2]])
    lp = L.token_logprobs(logits, targets)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp, want, atol=1e-6)
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(L.sequence_logprob(lp, mask), (lp * mask).sum(1), atol=1e-6)
    np.testing.assert_allclose(
        L.sequence_logprob(lp, mask, normalize=True), (lp * mask).sum(1) / mask.sum(1), atol=1e-6
    )


def test_dpo_loss_is_log2_at_zero_margin_and_pushes_margin_up():
    z = jnp.array([-3.0, -5.0])
    loss, m = L.dpo_loss(z, z, z, z, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    assert float(m["accuracy"]) == 0.0 and float(m["reward_margin"]) == 0.0
    grads = jax.grad(lambda *a: L.dpo_loss(*a, beta=0.1)[0], argnums=(0, 1, 2, 3))(z, z, z, z)
    assert np.all(grads[0] < 0) and np.all(grads[1] > 0)  # raise chosen, lower rejected
    assert not np.any(grads[2]) and not np.any(grads[3])  # the reference is frozen
    # A hand margin: beta * ((-1 - -2) - (-4 - -3)) = 0.1 * 2.
    loss, m = L.dpo_loss(
        jnp.array([-1.0]), jnp.array([-4.0]), jnp.array([-2.0]), jnp.array([-3.0]), 0.1
    )
    np.testing.assert_allclose(loss, math.log1p(math.exp(-0.2)), rtol=1e-6)
    np.testing.assert_allclose(m["reward_margin"], 0.2, rtol=1e-6)
    assert float(m["accuracy"]) == 1.0


def test_log_odds_hand_values():
    np.testing.assert_allclose(
        L.log_odds(jnp.log(jnp.array([0.5, 0.2, 1e-6]))),
        [0.0, math.log(0.25), math.log(1e-6 / (1 - 1e-6))],
        rtol=1e-5,
        atol=1e-6,
    )


def test_orpo_is_finite_and_stable_for_logp_near_zero():
    chosen = jnp.array([0.0, -1e-9, -1e-6, -1e-3])
    rejected = jnp.array([-2.0, -1e-8, -0.5, -1e-3])
    nll = -chosen

    def loss(c, r):
        return L.orpo_loss(nll, c, r, lam=0.1)[0]

    value = loss(chosen, rejected)
    g_c, g_r = jax.grad(loss, argnums=(0, 1))(chosen, rejected)
    assert np.isfinite(value) and np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))
    # Equal chosen and rejected odds cost exactly log 2.
    _, m = L.orpo_loss(nll[3:], chosen[3:], rejected[3:], lam=0.1)
    np.testing.assert_allclose(m["or_loss"], math.log(2.0), rtol=1e-5)
    # More confident chosen than rejected -> positive log-odds ratio and lower loss.
    assert float(L.log_odds(-1e-6)) > float(L.log_odds(-1e-4)) > 0
    assert np.all(g_c[1:] <= 0) and np.all(g_r[1:] >= 0)
