"""Advantages for policy-gradient RL: GAE, discounted returns, whitening, group-relative (GRPO).

Shapes (suffixes):
  B  responses (rows)                T  response tokens, right-padded
  G  samples per prompt (a GRPO group)

`mask_BxT` is 1.0 on response tokens and 0.0 on padding. Rewards are per token: an outcome
reward sits on a response's last token, PRM rewards on step ends, a KL penalty on every token.
Every function is pure and jittable; nothing here takes gradients through its outputs, so
callers compute advantages outside the loss (or under `jax.lax.stop_gradient`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of `x` where `mask` > 0 (weighted by `mask`); 0 where no position is valid."""
    # `where` first, so inf/NaN garbage in padding cannot leak in through 0 * inf.
    total = jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1e-8)


def masked_var(x: Array, mask: Array) -> Array:
    """Population variance of `x` over positions where `mask` > 0."""
    return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)


def gae(
    rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float, lam: float
) -> tuple[Array, Array]:
    """Generalized advantage estimation over valid tokens; returns (advantages, returns), 0 on pad.

    The trajectory of a row is its valid tokens in order. The value after the last one is 0 (the
    response has ended), and masked positions are skipped, so a gap (e.g. tool output inside a
    response) passes the discount through untouched. returns = advantages + values.
    """
    rewards_BxT, values_BxT, mask_BxT = (
        jnp.asarray(a, jnp.float32) for a in (rewards_BxT, values_BxT, mask_BxT)
    )

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = xs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = delta_B + gamma * lam * next_adv_B
        valid_B = m_B > 0
        # Padding keeps the carry, so the zeros that start the scan bootstrap the last token.
        carry = (jnp.where(valid_B, v_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
        return carry, jnp.where(valid_B, adv_B, 0.0)

    zeros_B = jnp.zeros(rewards_BxT.shape[0], jnp.float32)
    _, adv_TxB = jax.lax.scan(
        step, (zeros_B, zeros_B), (rewards_BxT.T, values_BxT.T, mask_BxT.T), reverse=True
    )
    advantages_BxT = adv_TxB.T
    returns_BxT = jnp.where(mask_BxT > 0, advantages_BxT + values_BxT, 0.0)
    return advantages_BxT, returns_BxT


def discounted_returns(rewards_BxT: Array, mask_BxT: Array, gamma: float) -> Array:
    """Reward-to-go sum_k gamma^k r_{t+k} over valid tokens, 0 on padding."""
    # GAE with zero values and lam = 1 telescopes to exactly the discounted reward-to-go.
    advantages_BxT, _ = gae(rewards_BxT, jnp.zeros_like(rewards_BxT), mask_BxT, gamma, 1.0)
    return advantages_BxT


def whiten(x_BxT: Array, mask_BxT: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Normalizes `x` to unit variance (and zero mean if `shift_mean`) over valid tokens; 0 on pad.

    Statistics are over all valid tokens of the batch (population variance). With
    `shift_mean=False` the mean is added back, which keeps the sign of e.g. rewards intact.
    """
    x_BxT = jnp.asarray(x_BxT, jnp.float32)
    mean = masked_mean(x_BxT, mask_BxT)
    whitened_BxT = (x_BxT - mean) * jax.lax.rsqrt(masked_var(x_BxT, mask_BxT) + eps)
    if not shift_mean:
        whitened_BxT = whitened_BxT + mean
    return jnp.where(mask_BxT > 0, whitened_BxT, 0.0)


def group_relative(scores_BxG: Array, eps: float = 1e-6, normalize_std: bool = True) -> Array:
    """GRPO advantages (r - mean_group) / (std_group + eps); Dr. GRPO drops the std division.

    The std is the population std over the G samples of a prompt (ddof=0). A group whose samples
    all score alike gets zero advantages, so it contributes no gradient.
    """
    scores_BxG = jnp.asarray(scores_BxG, jnp.float32)
    centered_BxG = scores_BxG - jnp.mean(scores_BxG, axis=1, keepdims=True)
    if normalize_std:
        centered_BxG = centered_BxG / (jnp.std(scores_BxG, axis=1, keepdims=True) + eps)
    return centered_BxG


def broadcast_to_tokens(adv_B: Array, mask_BxT: Array) -> Array:
    """Gives every valid token of row b the sequence-level advantage adv_B[b]; 0 on padding."""
    return jnp.where(mask_BxT > 0, jnp.asarray(adv_B, jnp.float32)[:, None], 0.0)
