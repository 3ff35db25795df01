"""RL objectives on the one loop: PPO, GRPO, expert iteration, DPO and ORPO.

Each is a loss factory fed by a rollout producer (rl/rollout.py) that samples with the
current parameters. Batches hold prompt + response rows whose per-position arrays are aligned
on targets (see rl/buffers.py): `response_mask` marks the generated tokens, and the old and
reference log-probs, advantages and returns are data computed at rollout time, so the loss
never sees the reference parameters. Preference batches hold pairs: [b, 2, L], chosen first.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import rl.compare  # noqa: F401  (registers the "rl" evaluation)
from rl import kl as kl_lib
from rl import ppo_losses
from rl.advantages import masked_mean
from train.objectives import register


def _forward(model, params, inputs_BxL, targets_BxL, segment_ids_BxL):
    """(log p(target) [B, L], model output) of the policy."""
    out = model.apply({"params": params}, inputs_BxL, None, segment_ids_BxL, method="forward")
    return ppo_losses.token_logprobs(out.logits, targets_BxL), out


CRITICS = ("shared", "detached")


def _values(params, out, critic: str):
    """The value head's [B, L] output; "detached" keeps the value loss out of the trunk.

    With a shared trunk the critic's early, large errors pull on the features the policy
    uses; detached, the head is a linear probe of the policy's own features.
    """
    if critic == "shared":
        return out.scores["value"]
    hidden_BxLxD = jax.lax.stop_gradient(out.hidden_BxLxD).astype(jnp.float32)
    head = nn.Dense(1, dtype=jnp.float32)  # the value head's layer (model.transformer)
    return head.apply({"params": params["value_head"]}, hidden_BxLxD)[..., 0]


def _policy_gradient_loss(config, model, *, critic: bool):
    """Clipped surrogate + KL to the reference (when in the loss) - entropy [+ value loss]."""
    rl = config.rl
    clip_high = rl.clip_eps_high if rl.clip_eps_high > 0 else None
    if critic and rl.critic not in CRITICS:
        raise ValueError(f"rl.critic must be one of {CRITICS}, got {rl.critic!r}")

    def loss_fn(params, batch, rng):
        del rng  # deterministic: no dropout in the decoder
        mask_BxL = batch["response_mask"]
        logprobs_BxL, out = _forward(
            model, params, batch["inputs"], batch["targets"], batch["segment_ids"]
        )
        loss, metrics = ppo_losses.ppo_policy_loss(
            logprobs_BxL,
            batch["old_logprobs"],
            batch["advantages"],
            mask_BxL,
            rl.clip_eps,
            clip_high,
            rl.aggregation,
        )
        kl_BxL = kl_lib.kl_k3(logprobs_BxL, batch["ref_logprobs"])
        kl_loss = ppo_losses.aggregate(batch["kl_coef"][:, None] * kl_BxL, mask_BxL, rl.aggregation)
        entropy = ppo_losses.entropy_from_logits(out.logits, mask_BxL)
        loss = loss + kl_loss - rl.entropy_coef * entropy
        metrics |= {
            "kl_ref": masked_mean(jax.lax.stop_gradient(kl_BxL), mask_BxL),
            "entropy": jax.lax.stop_gradient(entropy),
            "response_tokens": jnp.sum(mask_BxL),
        }
        if critic:
            v_loss, v_metrics = ppo_losses.value_loss(
                _values(params, out, rl.critic),
                batch["old_values"],
                batch["returns"],
                mask_BxL,
                rl.value_clip_eps,
                rl.aggregation,
            )
            loss = loss + rl.value_coef * v_loss
            metrics |= v_metrics
        return loss, metrics

    return loss_fn


@register("ppo", heads=("value",), batches="rollout_ppo", evaluation="rl")
def make_ppo_loss(config, model):
    """PPO: clipped surrogate on GAE advantages, clipped value loss on the value head."""
    return _policy_gradient_loss(config, model, critic=True)


@register("grpo", batches="rollout_grpo", evaluation="rl")
def make_grpo_loss(config, model):
    """GRPO: clipped surrogate on group-relative advantages; no critic."""
    return _policy_gradient_loss(config, model, critic=False)


@register("expert_iteration", batches="rollout_ei", evaluation="rl")
def make_expert_iteration_loss(config, model):
    """Expert iteration: SFT cross-entropy on the policy's own verified-correct responses."""
    del config

    def loss_fn(params, batch, rng):
        del rng
        logprobs_BxL, _ = _forward(
            model, params, batch["inputs"], batch["targets"], batch["segment_ids"]
        )
        ce = -masked_mean(logprobs_BxL, batch["response_mask"])
        return ce, {"ce": ce, "response_tokens": jnp.sum(batch["response_mask"])}

    return loss_fn


def _pair_logprobs(model, params, batch, normalize: bool):
    """Summed (or, if `normalize`, mean) response log-probs of each pair: [b, 2], chosen first."""
    b, _, L = batch["inputs"].shape
    flat = {k: batch[k].reshape(2 * b, L) for k in ("inputs", "targets", "segment_ids")}
    logprobs_BxL, _ = _forward(model, params, flat["inputs"], flat["targets"], flat["segment_ids"])
    mask_BxL = batch["response_mask"].reshape(2 * b, L)
    return ppo_losses.sequence_logprob(logprobs_BxL, mask_BxL, normalize).reshape(b, 2)


@register("dpo", batches="rollout_pairs", evaluation="rl")
def make_dpo_loss(config, model):
    """DPO on (verified-correct, verified-wrong) responses to the same prompt."""
    beta = config.rl.dpo_beta

    def loss_fn(params, batch, rng):
        del rng
        logp_Bx2 = _pair_logprobs(model, params, batch, normalize=False)
        ref_Bx2 = batch["ref_logp"]
        return ppo_losses.dpo_loss(
            logp_Bx2[:, 0], logp_Bx2[:, 1], ref_Bx2[:, 0], ref_Bx2[:, 1], beta
        )

    return loss_fn


@register("orpo", batches="rollout_pairs", evaluation="rl")
def make_orpo_loss(config, model):
    """ORPO: NLL of the correct response plus the odds-ratio term against the wrong one."""
    lam = config.rl.orpo_lambda

    def loss_fn(params, batch, rng):
        del rng
        mean_logp_Bx2 = _pair_logprobs(model, params, batch, normalize=True)
        return ppo_losses.orpo_loss(
            -mean_logp_Bx2[:, 0], mean_logp_Bx2[:, 0], mean_logp_Bx2[:, 1], lam
        )

    return loss_fn
