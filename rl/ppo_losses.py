"""Policy-optimization losses: PPO's clipped surrogate and value loss, entropy, DPO and ORPO.

Shapes (suffixes):
  B  responses (rows)      T  response tokens, right-padded      V  vocabulary

`mask_BxT` is 1.0 on response tokens and 0.0 on padding. Log-probs are those of the sampled
tokens. Each loss returns `(scalar loss, metrics dict of scalars)` and is pure and jittable;
old log-probs, old values, advantages, returns and reference log-probs are data, so their
gradients are stopped here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rl.advantages import masked_mean, masked_var

Array = jax.Array
sg = jax.lax.stop_gradient


def _token_mean(loss_BxT: Array, mask_BxT: Array) -> Array:
    """Mean over all valid tokens of the batch."""
    return masked_mean(loss_BxT, mask_BxT)


def _sequence_mean(loss_BxT: Array, mask_BxT: Array) -> Array:
    """Mean within each non-empty response, then over responses."""
    per_row_B = masked_mean(loss_BxT, mask_BxT, axis=1)
    return masked_mean(per_row_B, (jnp.sum(mask_BxT, axis=1) > 0).astype(jnp.float32))


def _constant(loss_BxT: Array, mask_BxT: Array) -> Array:
    """Sum over valid tokens divided by the fixed B * T."""
    return jnp.sum(jnp.where(mask_BxT > 0, loss_BxT, 0.0) * mask_BxT) / loss_BxT.size


# How per-token losses become one scalar:
#   token_mean     sum over valid tokens / their count: every token weighs the same (DAPO);
#   sequence_mean  mean within each response, then over responses (original GRPO): a token of
#                  a short response weighs more than one of a long response;
#   constant       sum over valid tokens / (B * T): no length normalization at all (Dr. GRPO).
AGGREGATIONS: dict[str, Callable[[Array, Array], Array]] = {
    "token_mean": _token_mean,
    "sequence_mean": _sequence_mean,
    "constant": _constant,
}


def aggregate(loss_BxT: Array, mask_BxT: Array, how: str = "token_mean") -> Array:
    """Reduces per-token losses to a scalar with one of `AGGREGATIONS`."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; use one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[how](loss_BxT, jnp.asarray(mask_BxT, jnp.float32))


def ppo_policy_loss(
    logprobs_BxT: Array,
    old_logprobs_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    clip_eps: float,
    clip_eps_high: float | None = None,
    aggregation: str = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate -min(r A, clip(r, 1-eps, 1+eps_high) A), aggregated over tokens.

    `clip_eps_high` > `clip_eps` is DAPO's "clip-higher": it lets unlikely tokens with positive
    advantage grow further before clipping. By default the loss is the mean over all valid tokens
    of the batch (see `AGGREGATIONS`). Metrics: `clip_fraction` (valid tokens whose gradient the
    clip removes), `approx_kl` (k3 estimate of KL(old || new) under old's samples), `ratio_mean`.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask_BxT = jnp.asarray(mask_BxT, jnp.float32)
    advantages_BxT = sg(advantages_BxT)
    log_ratio_BxT = logprobs_BxT - sg(old_logprobs_BxT)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    surrogate_BxT = ratio_BxT * advantages_BxT
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + eps_high) * advantages_BxT
    loss = aggregate(-jnp.minimum(surrogate_BxT, clipped_BxT), mask_BxT, aggregation)
    # The min picks the clipped (constant) branch exactly in these two cases.
    clipped_active_BxT = ((ratio_BxT > 1.0 + eps_high) & (advantages_BxT > 0)) | (
        (ratio_BxT < 1.0 - clip_eps) & (advantages_BxT < 0)
    )
    metrics = {
        "policy_loss": loss,
        "clip_fraction": masked_mean(clipped_active_BxT.astype(jnp.float32), mask_BxT),
        "approx_kl": masked_mean(ratio_BxT - 1.0 - log_ratio_BxT, mask_BxT),
        "ratio_mean": masked_mean(ratio_BxT, mask_BxT),
    }
    return loss, jax.tree.map(sg, metrics)


def value_loss(
    values_BxT: Array,
    old_values_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    clip_eps: float,
    aggregation: str = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), v_clip within old +- clip_eps.

    Metrics: `value_clip_fraction` (tokens where the clipped error is larger, so no gradient
    flows), `explained_variance` 1 - Var(R - v) / Var(R) of the current values (0 if Var(R) = 0),
    `value_mean`.
    """
    mask_BxT = jnp.asarray(mask_BxT, jnp.float32)
    old_values_BxT, returns_BxT = sg(old_values_BxT), sg(returns_BxT)
    clipped_values_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip_eps, clip_eps)
    error_BxT = jnp.square(values_BxT - returns_BxT)
    clipped_error_BxT = jnp.square(clipped_values_BxT - returns_BxT)
    loss = 0.5 * aggregate(jnp.maximum(error_BxT, clipped_error_BxT), mask_BxT, aggregation)
    var_returns = masked_var(returns_BxT, mask_BxT)
    var_residual = masked_var(returns_BxT - values_BxT, mask_BxT)
    explained = jnp.where(
        var_returns > 0, 1.0 - var_residual / jnp.where(var_returns > 0, var_returns, 1.0), 0.0
    )
    metrics = {
        "value_loss": loss,
        "value_clip_fraction": masked_mean(
            (clipped_error_BxT > error_BxT).astype(jnp.float32), mask_BxT
        ),
        "explained_variance": explained,
        "value_mean": masked_mean(values_BxT, mask_BxT),
    }
    return loss, jax.tree.map(sg, metrics)


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log softmax(logits)[target] per position, in float32."""
    logits_BxTxV = jnp.asarray(logits_BxTxV, jnp.float32)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return picked_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


def entropy_from_logits(logits_BxTxV: Array, mask_BxT: Array) -> Array:
    """Mean over valid tokens of the entropy of softmax(logits), in nats."""
    logp_BxTxV = jax.nn.log_softmax(jnp.asarray(logits_BxTxV, jnp.float32), axis=-1)
    entropy_BxT = -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)
    return masked_mean(entropy_BxT, jnp.asarray(mask_BxT, jnp.float32))


def sequence_logprob(token_logprobs_BxT: Array, mask_BxT: Array, normalize: bool = False) -> Array:
    """Sum of a response's token log-probs, or their mean over its tokens if `normalize`."""
    mask_BxT = jnp.asarray(mask_BxT, jnp.float32)
    if normalize:
        return masked_mean(token_logprobs_BxT, mask_BxT, axis=1)
    return jnp.sum(jnp.where(mask_BxT > 0, token_logprobs_BxT, 0.0) * mask_BxT, axis=1)


def dpo_loss(
    policy_chosen_logp_B: Array,
    policy_rejected_logp_B: Array,
    ref_chosen_logp_B: Array,
    ref_rejected_logp_B: Array,
    beta: float,
) -> tuple[Array, dict[str, Array]]:
    """DPO: -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]) on sequence log-probs.

    Metrics: implicit rewards beta * (pi - ref) of chosen and rejected, their `reward_margin`, and
    `accuracy` (fraction of pairs with a positive margin).
    """
    reward_chosen_B = beta * (policy_chosen_logp_B - sg(ref_chosen_logp_B))
    reward_rejected_B = beta * (policy_rejected_logp_B - sg(ref_rejected_logp_B))
    margin_B = reward_chosen_B - reward_rejected_B
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_B))
    metrics = {
        "dpo_loss": loss,
        "reward_chosen": jnp.mean(reward_chosen_B),
        "reward_rejected": jnp.mean(reward_rejected_B),
        "reward_margin": jnp.mean(margin_B),
        "accuracy": jnp.mean((margin_B > 0).astype(jnp.float32)),
    }
    return loss, jax.tree.map(sg, metrics)


def log_odds(logp: Array, max_logp: float = -1e-6) -> Array:
    """log(p / (1 - p)) from log p, stable near p = 1 (logp is capped at `max_logp` < 0)."""
    logp = jnp.minimum(jnp.asarray(logp, jnp.float32), max_logp)
    # log(1 - e^x): expm1 is exact near x = 0, log1p near x = -inf (Maechler's log1mexp).
    log1m_p = jnp.where(logp > -0.6931472, jnp.log(-jnp.expm1(logp)), jnp.log1p(-jnp.exp(logp)))
    return logp - log1m_p


def orpo_loss(
    chosen_nll_B: Array, chosen_logp_mean_B: Array, rejected_logp_mean_B: Array, lam: float
) -> tuple[Array, dict[str, Array]]:
    """ORPO: NLL(chosen) + lam * -log sigmoid(log odds(chosen) - log odds(rejected)).

    Odds use length-normalized log-probs (mean token log-prob of each response), as in the
    paper. Metrics: `nll`, `or_loss`, `log_odds_ratio`, `accuracy` (chosen has higher odds).
    """
    log_odds_ratio_B = log_odds(chosen_logp_mean_B) - log_odds(rejected_logp_mean_B)
    or_loss_B = -jax.nn.log_sigmoid(log_odds_ratio_B)
    loss = jnp.mean(chosen_nll_B + lam * or_loss_B)
    metrics = {
        "orpo_loss": loss,
        "nll": jnp.mean(chosen_nll_B),
        "or_loss": jnp.mean(or_loss_B),
        "log_odds_ratio": jnp.mean(log_odds_ratio_B),
        "accuracy": jnp.mean((log_odds_ratio_B > 0).astype(jnp.float32)),
    }
    return loss, jax.tree.map(sg, metrics)
