"""Training rows from one scored rollout, per algorithm: PPO, GRPO, expert iteration, pairs.

Shapes (suffixes):
  R  rollout rows (prompt-major: row p*G + g is sample g of prompt p)    G  samples per prompt
  L  row length (prompt + response, right-padded)                        N  buffer rows

Every row array is aligned on *target* positions: column t of `old_logprobs`, `advantages`,
`response_mask`... belongs to the token `targets[t] = inputs[t + 1]`, the way the loss reads
the model's logits at t. Builders are pure host functions returning dicts of numpy arrays
with a leading row axis; the rollout producer serves them in minibatches.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rl import advantages as adv_lib
from rl.rewards import Responses, Scored, kl_penalty

# Jitted once per shape: eager GAE would retrace its scan body on every rollout.
_gae = jax.jit(adv_lib.gae, static_argnames=("gamma", "lam"))


@dataclasses.dataclass(frozen=True)
class Rollout:
    """A rollout as fixed-shape host arrays, with the policy's and reference's log-probs."""

    responses: Responses
    group_size: int
    targets_RxL: np.ndarray  # int32 inputs shifted left by one
    segment_ids_RxL: np.ndarray  # int32, 1 on prompt + response tokens, 0 on padding
    response_mask_RxL: np.ndarray  # float32, 1 where the target is a generated token
    old_logprobs_RxL: np.ndarray  # float32 log p_old(target), 0 off the response
    ref_logprobs_RxL: np.ndarray  # float32 log p_ref(target), 0 off the response
    values_RxL: np.ndarray  # float32 value head at each position (0 without a critic)


def to_positions(x_RxT: np.ndarray, prompt_lengths_R: np.ndarray, length: int) -> np.ndarray:
    """Response-coordinate values [R, T] moved to target positions [R, L] (column j -> p-1+j)."""
    num_rows, num_tokens = x_RxT.shape
    out_RxL = np.zeros((num_rows, length), x_RxT.dtype)
    columns_RxT = prompt_lengths_R[:, None] - 1 + np.arange(num_tokens)[None, :]
    rows_RxT = np.broadcast_to(np.arange(num_rows)[:, None], columns_RxT.shape)
    keep_RxT = columns_RxT < length
    out_RxL[rows_RxT[keep_RxT], columns_RxT[keep_RxT]] = x_RxT[keep_RxT]
    return out_RxL


def policy_rows(rollout: Rollout) -> dict[str, np.ndarray]:
    """The arrays every policy-gradient batch carries."""
    return {
        "inputs": rollout.responses.inputs_RxL,
        "targets": rollout.targets_RxL,
        "segment_ids": rollout.segment_ids_RxL,
        "response_mask": rollout.response_mask_RxL,
        "old_logprobs": rollout.old_logprobs_RxL,
        "ref_logprobs": rollout.ref_logprobs_RxL,
    }


def token_rewards(rollout: Rollout, scored: Scored) -> np.ndarray:
    """The reward mix at target positions [R, L]."""
    length = rollout.targets_RxL.shape[1]
    return to_positions(scored.rewards_RxT, rollout.responses.prompt_lengths_R, length)


def rollout_kl(rollout: Rollout, estimator: str) -> np.ndarray:
    """Per-token KL(policy || reference) estimates at target positions [R, L]."""
    return kl_penalty(
        rollout.old_logprobs_RxL, rollout.ref_logprobs_RxL, rollout.response_mask_RxL, estimator
    )


def ppo_buffer(
    rollout: Rollout,
    scored: Scored,
    *,
    kl_coef: float,
    kl_in_reward: bool,
    estimator: str,
    gamma: float,
    lam: float,
    whiten: bool,
) -> dict[str, np.ndarray]:
    """GAE(gamma, lam) advantages over per-token rewards (minus the KL penalty if in reward)."""
    mask_RxL = rollout.response_mask_RxL
    rewards_RxL = token_rewards(rollout, scored)
    if kl_in_reward:
        rewards_RxL = rewards_RxL - kl_coef * rollout_kl(rollout, estimator)
    advantages_RxL, returns_RxL = _gae(
        rewards_RxL, rollout.values_RxL, mask_RxL, gamma=gamma, lam=lam
    )
    if whiten:
        advantages_RxL = adv_lib.whiten(advantages_RxL, mask_RxL)
    in_loss = 0.0 if kl_in_reward else kl_coef
    return {
        **policy_rows(rollout),
        "old_values": np.where(mask_RxL > 0, rollout.values_RxL, 0.0).astype(np.float32),
        "advantages": np.asarray(advantages_RxL, np.float32),
        "returns": np.asarray(returns_RxL, np.float32),
        "kl_coef": np.full(len(mask_RxL), in_loss, np.float32),
    }


def grpo_buffer(
    rollout: Rollout,
    scored: Scored,
    *,
    kl_coef: float,
    kl_in_reward: bool,
    estimator: str,
    normalize_std: bool,
) -> dict[str, np.ndarray]:
    """Group-relative advantages of each response's total reward, on all its tokens."""
    mask_RxL = rollout.response_mask_RxL
    scores_R = scored.rewards_RxT.sum(axis=1)
    if kl_in_reward:
        scores_R = scores_R - kl_coef * rollout_kl(rollout, estimator).sum(axis=1)
    groups_PxG = scores_R.reshape(-1, rollout.group_size)
    adv_R = np.asarray(adv_lib.group_relative(groups_PxG, normalize_std=normalize_std)).reshape(-1)
    in_loss = 0.0 if kl_in_reward else kl_coef
    return {
        **policy_rows(rollout),
        "advantages": np.asarray(adv_lib.broadcast_to_tokens(adv_R, mask_RxL), np.float32),
        "kl_coef": np.full(len(mask_RxL), in_loss, np.float32),
    }


def cycle_to_multiple(rows: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Repeats rows cyclically up to the next multiple of `multiple` (fixed batch shapes)."""
    n = len(next(iter(rows.values())))
    target = -(-n // multiple) * multiple
    order = np.arange(target) % n
    return {key: value[order] for key, value in rows.items()}


def ei_buffer(rollout: Rollout, scored: Scored, *, multiple: int) -> dict[str, np.ndarray]:
    """Expert iteration: the verified-correct responses (empty dict when there are none)."""
    keep = np.flatnonzero(scored.correct_R >= 1.0)
    if not keep.size:
        return {}
    rows = {
        "inputs": rollout.responses.inputs_RxL[keep],
        "targets": rollout.targets_RxL[keep],
        "segment_ids": rollout.segment_ids_RxL[keep],
        "response_mask": rollout.response_mask_RxL[keep],
    }
    return cycle_to_multiple(rows, multiple)


def preference_pairs(correct_R: np.ndarray, group_size: int) -> np.ndarray:
    """[K, 2] row indices (chosen correct, rejected wrong), zipped within each prompt's group."""
    pairs = []
    for start in range(0, len(correct_R), group_size):
        group = np.arange(start, start + group_size)
        right, wrong = group[correct_R[group] >= 1.0], group[correct_R[group] < 1.0]
        pairs += list(zip(right, wrong, strict=False))
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def pair_buffer(rollout: Rollout, scored: Scored, *, multiple: int) -> dict[str, np.ndarray]:
    """DPO/ORPO pairs [K, 2, L] from the same prompt; empty dict when no prompt has both."""
    pairs_Kx2 = preference_pairs(scored.correct_R, rollout.group_size)
    if not len(pairs_Kx2):
        return {}
    mask_RxL = rollout.response_mask_RxL
    ref_logp_R = np.where(mask_RxL > 0, rollout.ref_logprobs_RxL, 0.0).sum(axis=1)
    rows = {
        "inputs": rollout.responses.inputs_RxL[pairs_Kx2],
        "targets": rollout.targets_RxL[pairs_Kx2],
        "segment_ids": rollout.segment_ids_RxL[pairs_Kx2],
        "response_mask": mask_RxL[pairs_Kx2],
        "ref_logp": ref_logp_R[pairs_Kx2].astype(np.float32),
    }
    return cycle_to_multiple(rows, multiple)


def explained_variance(values_RxL, returns_RxL, mask_RxL) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens (0 if Var(returns) = 0)."""
    var_returns = float(adv_lib.masked_var(returns_RxL, mask_RxL))
    if var_returns <= 0:
        return 0.0
    return 1.0 - float(adv_lib.masked_var(returns_RxL - values_RxL, mask_RxL)) / var_returns
