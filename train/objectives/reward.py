"""Reward-model objectives: binary cross-entropy on the reward head at marked tokens.

  orm  outcome: the logit at each response's last token predicts whether its answer is
       right (`orm_target` where `orm_mask`).
  prm  process: the logit at each step-end "\\n" predicts whether the step is good
       (`step_target` where `step_end_mask`); soft targets (Monte-Carlo success rates)
       work the same way.

Both read packed batches of the "rm" producer (data.rm_builder) and are judged by the
"reward" evaluation (AUC, accuracy, first-error localization). Only the reward head's
output is computed; the vocabulary projection is skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from train.objectives import register
from train.objectives.sft import masked_mean


def reward_scores(model, params, batch) -> jax.Array:
    """The reward head's logits [B, L] on a batch's inputs."""
    out = model.apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        compute_logits=False,
        response_mask_BxL=batch["loss_mask"],  # the surprise of response tokens only
        method="forward",
    )
    return out.scores["reward"]


def marked_bce(
    logits_BxL, targets_BxL, mask_BxL, negative_weight: float = 1.0
) -> tuple[jax.Array, dict]:
    """Weighted mean sigmoid cross-entropy over the mask, and accuracy/calibration metrics.

    A label of 1 weighs 1 and a label of 0 weighs `negative_weight` (a soft target t weighs
    t + (1 - t) * negative_weight). Wrong steps are rare in a good policy's samples (3% of
    the labelled steps of the session-13 SFT model's multiplication traces), and at weight 1
    the PRM's loss stayed near the entropy of that rate; a weight of 10 did not make it a
    better ranker though (README). The metrics (`bce` included) are unweighted, so runs with
    different weights compare.
    """
    mask_BxL = mask_BxL.astype(jnp.float32)
    bce_BxL = optax.sigmoid_binary_cross_entropy(logits_BxL, targets_BxL)
    weights_BxL = mask_BxL * (targets_BxL + (1.0 - targets_BxL) * negative_weight)
    loss = jnp.sum(bce_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1e-6)
    right_BxL = ((logits_BxL > 0) == (targets_BxL >= 0.5)).astype(jnp.float32)
    metrics = {
        "bce": masked_mean(bce_BxL, mask_BxL),
        "accuracy": masked_mean(right_BxL, mask_BxL),
        "mean_prob": masked_mean(jax.nn.sigmoid(logits_BxL), mask_BxL),
        "positive_rate": masked_mean(targets_BxL, mask_BxL),
        "labelled": jnp.sum(mask_BxL),
    }
    return loss, metrics


def negative_weight_of(config: ml_collections.ConfigDict) -> float:
    """`config.loss.negative_weight`, checked to be a positive number."""
    weight = config.loss.negative_weight
    if not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(
            f"loss.negative_weight must be a number > 0 (1: plain BCE), got {weight!r}"
        )
    return float(weight)


@register("orm", heads=("reward",), batches="rm", evaluation="reward")
def make_orm_loss(config: ml_collections.ConfigDict, model):
    """Outcome reward model: BCE at each response's last token."""
    negative_weight = negative_weight_of(config)

    def loss_fn(params, batch, rng):
        del rng  # deterministic
        logits_BxL = reward_scores(model, params, batch)
        return marked_bce(logits_BxL, batch["orm_target"], batch["orm_mask"], negative_weight)

    return loss_fn


@register("prm", heads=("reward",), batches="rm", evaluation="reward")
def make_prm_loss(config: ml_collections.ConfigDict, model):
    """Process reward model: BCE (hard or soft targets) at each labelled step end."""
    negative_weight = negative_weight_of(config)

    def loss_fn(params, batch, rng):
        del rng  # deterministic
        logits_BxL = reward_scores(model, params, batch)
        return marked_bce(logits_BxL, batch["step_target"], batch["step_end_mask"], negative_weight)

    return loss_fn
