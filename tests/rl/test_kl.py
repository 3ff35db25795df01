"""KL estimators against exact KL by Monte Carlo, exact KL properties, and the controllers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import kl


def test_k1_and_k3_means_match_exact_kl_under_sampling_from_p():
    logits_p = jnp.array([1.0, 0.2, -0.5, 0.0, 2.0, -1.0])
    logits_q = jnp.array([0.3, 0.5, 0.0, -0.7, 1.2, 0.4])
    exact = float(kl.full_kl(logits_p[None, None], logits_q[None, None])[0, 0])
    tokens = jax.random.categorical(jax.random.key(0), logits_p, shape=(100_000,))
    logp = jax.nn.log_softmax(logits_p)[tokens]
    ref_logp = jax.nn.log_softmax(logits_q)[tokens]
    k1, k3 = kl.kl_k1(logp, ref_logp), kl.kl_k3(logp, ref_logp)
    assert exact > 0.1
    assert float(jnp.mean(k1)) == pytest.approx(exact, rel=0.05)
    assert float(jnp.mean(k3)) == pytest.approx(exact, rel=0.05)
    # k1 is negative on many samples, k3 on none, and k3 varies less (the reason to use it).
    assert float(jnp.min(k1)) < 0 and float(jnp.min(k3)) >= 0
    assert float(jnp.var(k3)) < float(jnp.var(k1))


def test_estimators_on_hand_values_and_signs():
    logp = jnp.array([-1.0, -2.0, -0.5, -30.0, -0.1])
    ref = jnp.array([-2.0, -1.0, -0.5, -0.1, -30.0])
    d = np.asarray(logp - ref)
    np.testing.assert_allclose(kl.kl_k1(logp, ref), d)
    np.testing.assert_allclose(kl.kl_k2(logp, ref), 0.5 * d**2)
    np.testing.assert_allclose(kl.kl_k3(logp, ref), np.exp(-d) + d - 1, rtol=1e-5)
    assert np.all(np.asarray(kl.kl_k3(logp, ref)) >= 0)
    assert float(kl.kl_k3(jnp.float32(-3.0), jnp.float32(-3.0))) == 0.0
    np.testing.assert_array_equal(kl.estimate("k3", logp, ref), kl.kl_k3(logp, ref))
    with pytest.raises(ValueError, match="k1"):
        kl.estimate("k4", logp, ref)


def test_k3_is_non_negative_on_random_pairs():
    a, b = jax.random.normal(jax.random.key(1), (2, 1000)) * 5.0
    assert np.all(np.asarray(kl.kl_k3(a, b)) >= 0)


def test_full_kl_properties():
    p, q = jax.random.normal(jax.random.key(2), (2, 3, 4, 11)) * 3.0
    got = kl.full_kl(p, q)
    assert got.shape == (3, 4)
    assert np.all(np.asarray(got) >= -1e-6)
    np.testing.assert_array_equal(kl.full_kl(p, p), np.zeros((3, 4)))
    np.testing.assert_allclose(kl.full_kl(p + 7.0, q - 2.0), got, atol=1e-5)
    # Two classes: p = (1/2, 1/2), q = (1/4, 3/4).
    two = kl.full_kl(jnp.zeros((1, 1, 2)), jnp.log(jnp.array([[[0.25, 0.75]]])))
    np.testing.assert_allclose(two, 0.5 * math.log(2) + 0.5 * math.log(2 / 3), rtol=1e-5)


def test_adaptive_controller_moves_toward_target():
    state = kl.AdaptiveKL(0.1, target=6.0, horizon=10_000.0)
    up = kl.update(state, 12.0, 256)  # error clipped to +0.2
    np.testing.assert_allclose(up.coef, 0.1 * (1 + 0.2 * 256 / 10_000), rtol=1e-6)
    down = kl.update(state, 5.4, 256)  # error -0.1
    np.testing.assert_allclose(down.coef, 0.1 * (1 - 0.1 * 256 / 10_000), rtol=1e-6)
    assert float(kl.update(state, 6.0, 256).coef) == pytest.approx(0.1)
    assert float(kl.update(state, 0.0, 256).coef) < float(down.coef)  # clipped at -0.2


def test_controllers_are_pytrees_that_update_under_jit():
    state = kl.AdaptiveKL(jnp.float32(0.2), target=1.0, horizon=100.0)
    assert jax.tree.leaves(state) == [state.coef]
    step = jax.jit(kl.update)
    for _ in range(3):
        state = step(state, jnp.float32(3.0), 10)
    np.testing.assert_allclose(state.coef, 0.2 * 1.02**3, rtol=1e-6)
    assert state.target == 1.0 and state.horizon == 100.0
    fixed = kl.FixedKL(0.05)
    assert step(fixed, 100.0, 10).coef == pytest.approx(0.05)


def test_adaptive_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target"):
        kl.AdaptiveKL(0.1, target=0.0, horizon=10.0)
