"""GAE, returns, whitening and group-relative advantages against hand values and naive loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import advantages as adv


def naive_gae(rewards, values, mask, gamma, lam):
    """Textbook per-row GAE over the valid prefix of each right-padded row."""
    out_adv, out_ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            out_adv[b, t] = last
            out_ret[b, t] = last + values[b, t]
    return out_adv, out_ret


def test_gae_hand_computed_with_padding_garbage():
    # Padding holds garbage reward and value, which must not leak in.
    rewards = jnp.array([[0.0, 0.0, 1.0, 5.0]])
    values = jnp.array([[0.5, 0.6, 0.7, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    a, r = adv.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # d2 = 1 - 0.7, d1 = 0.9*0.7 - 0.6, d0 = 0.9*0.6 - 0.5, and A_t = d_t + 0.72 A_t+1.
    np.testing.assert_allclose(a, [[0.21712, 0.246, 0.3, 0.0]], atol=1e-6)
    np.testing.assert_allclose(r, [[0.71712, 0.846, 1.0, 0.0]], atol=1e-6)


def test_gae_matches_naive_loop_on_random_padded_batch():
    rng = np.random.default_rng(0)
    b, t = 6, 9
    lengths = np.array([0, 1, 4, 9, 7, 2])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    a, r = jax.jit(adv.gae)(rewards, values, mask, 0.95, 0.9)
    want_a, want_r = naive_gae(rewards, values, mask, 0.95, 0.9)
    np.testing.assert_allclose(a, want_a, atol=1e-5)
    np.testing.assert_allclose(r, want_r, atol=1e-5)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 5)).astype(np.float32)
    values = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    a, r = adv.gae(rewards, values, mask, 1.0, 1.0)
    masked_r = rewards * mask
    reward_to_go = np.cumsum(masked_r[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(a, (reward_to_go - values) * mask, atol=1e-5)
    np.testing.assert_allclose(r, reward_to_go, atol=1e-5)


def test_gae_skips_a_masked_gap_inside_the_response():
    rewards = jnp.array([[0.3, 7.0, 1.0]])
    values = jnp.array([[0.2, 7.0, 0.4]])
    gapped_a, _ = adv.gae(rewards, values, jnp.array([[1.0, 0.0, 1.0]]), 0.9, 0.8)
    dense_a, _ = adv.gae(rewards[:, ::2], values[:, ::2], jnp.ones((1, 2)), 0.9, 0.8)
    np.testing.assert_allclose(gapped_a[:, ::2], dense_a, atol=1e-6)
    assert float(gapped_a[0, 1]) == 0.0


def test_discounted_returns_hand_values():
    rewards = jnp.array([[1.0, 0.0, 2.0, 4.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    got = adv.discounted_returns(rewards, mask, gamma=0.5)
    np.testing.assert_allclose(got, [[1.5, 1.0, 2.0, 0.0]], atol=1e-6)


def test_whiten_uses_valid_tokens_only():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = adv.whiten(x, mask)
    valid = np.asarray(w)[np.asarray(mask) > 0]
    # Valid values are 1..5: mean 3, population var 2.
    np.testing.assert_allclose(valid, (np.array([1, 2, 3, 4, 5]) - 3) / np.sqrt(2), atol=1e-5)
    assert float(w[0, 3]) == 0.0 and float(w[1, 2]) == 0.0 and float(w[1, 3]) == 0.0
    kept = adv.whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(np.asarray(kept)[np.asarray(mask) > 0], valid + 3.0, atol=1e-5)


def test_group_relative_hand_values():
    scores = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    got = adv.group_relative(scores)
    # Row 0: mean 0.5, std 0.5. Row 2: mean 0.75, std sqrt(27/16).
    np.testing.assert_allclose(got[0], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_array_equal(got[1], np.zeros(4))
    std2 = np.sqrt(27 / 16)
    np.testing.assert_allclose(got[2], np.array([2.25, -0.75, -0.75, -0.75]) / std2, atol=1e-5)
    dr = adv.group_relative(scores, normalize_std=False)
    np.testing.assert_allclose(dr[2], [2.25, -0.75, -0.75, -0.75], atol=1e-6)


def test_broadcast_to_tokens():
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = adv.broadcast_to_tokens(jnp.array([2.0, -1.0]), mask)
    np.testing.assert_array_equal(got, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


@pytest.mark.parametrize("axis", [None, 1])
def test_masked_mean_ignores_nonfinite_padding(axis):
    x = jnp.array([[1.0, jnp.nan], [3.0, jnp.inf]])
    mask = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    got = adv.masked_mean(x, mask, axis=axis)
    np.testing.assert_allclose(got, 2.0 if axis is None else [1.0, 3.0])
