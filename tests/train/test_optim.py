"""The optimizer: warmup + cosine schedule, frozen parameters, per-parameter lr multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.configs.common import base_config
from train.optim import learning_rate_schedule, make_optimizer


def _params():
    return {
        "embed": {"embedding": jnp.ones((4, 3))},
        "layers": {"mlp": {"kernel": jnp.ones((3, 3))}},
        "value_head": {"kernel": jnp.zeros((3, 1)), "bias": jnp.zeros((1,))},
    }


def _opt(**overrides):
    opt = base_config().optimizer
    opt.update({"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.0, **overrides})
    return opt


def _one_update(opt, params):
    tx, _ = make_optimizer(opt, num_steps=10, params=params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_schedule_warms_up_then_decays_to_the_end_ratio():
    opt = _opt(lr=1.0, warmup_steps=4, end_lr_ratio=0.1)
    schedule = learning_rate_schedule(opt, num_steps=20)
    np.testing.assert_allclose([schedule(0), schedule(2), schedule(4)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(schedule(20), 0.1, atol=1e-6)
    assert schedule(12) < schedule(8) < 1.0


def test_frozen_parameters_get_zero_updates():
    updates = _one_update(_opt(freeze="embed"), _params())
    assert not np.any(updates["embed"]["embedding"])
    assert np.all(np.asarray(updates["layers"]["mlp"]["kernel"]) != 0)


def test_freeze_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        make_optimizer(_opt(freeze="nothing_here"), 10, _params())


def test_lr_multiplier_scales_only_the_matching_parameters():
    params = _params()
    base = _one_update(_opt(grad_clip=1e9), params)
    scaled = _one_update(_opt(grad_clip=1e9, lr_mult_pattern="value_head", lr_mult=20.0), params)
    np.testing.assert_allclose(scaled["value_head"]["kernel"], 20.0 * base["value_head"]["kernel"])
    np.testing.assert_allclose(scaled["layers"]["mlp"]["kernel"], base["layers"]["mlp"]["kernel"])
    assert optax.tree.norm(base["value_head"]) > 0


def test_lr_multiplier_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="lr_mult_pattern"):
        make_optimizer(_opt(lr_mult_pattern="critic", lr_mult=2.0), 10, _params())
