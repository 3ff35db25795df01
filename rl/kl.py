"""KL divergence between the policy and a reference: per-token estimators and coefficient control.

Shapes (suffixes):
  B  responses (rows)      T  response tokens      V  vocabulary

The estimators take log-probs of tokens *sampled from the policy* p, `logp` = log p(x) and
`ref_logp` = log q(x), elementwise on any shape, and estimate KL(p || q) (Schulman, "Approximating
KL divergence", 2020). With log r = ref_logp - logp:
  k1 = -log r              unbiased, high variance, negative on many samples;
  k2 = (log r)^2 / 2       biased (exact to second order when p ~ q), low variance, >= 0;
  k3 = (r - 1) - log r     unbiased and >= 0 on every sample, low variance when p ~ q.
Controllers are immutable pytrees with a pure `update(state, kl, n_steps) -> state`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """Per-token k1 = logp - ref_logp (unbiased; can be negative)."""
    return logp - ref_logp


def kl_k2(logp: Array, ref_logp: Array) -> Array:
    """Per-token k2 = (logp - ref_logp)^2 / 2 (biased, low variance, non-negative)."""
    return 0.5 * jnp.square(logp - ref_logp)


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased and non-negative)."""
    log_ratio = ref_logp - logp
    # expm1 keeps the cancellation exact when log_ratio ~ 0.
    return jnp.expm1(log_ratio) - log_ratio


ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def estimate(kind: str, logp: Array, ref_logp: Array) -> Array:
    """Per-token KL estimate with the estimator named `kind` ("k1", "k2" or "k3")."""
    if kind not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; use one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[kind](logp, ref_logp)


def full_kl(logits_p_BxTxV: Array, logits_q_BxTxV: Array) -> Array:
    """Exact KL(p || q) per position between softmax(logits_p) and softmax(logits_q), [B, T]."""
    logp_BxTxV = jax.nn.log_softmax(jnp.asarray(logits_p_BxTxV, jnp.float32), axis=-1)
    logq_BxTxV = jax.nn.log_softmax(jnp.asarray(logits_q_BxTxV, jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - logq_BxTxV), axis=-1)


@flax.struct.dataclass
class FixedKL:
    """A constant KL coefficient."""

    coef: Array | float

    def update(self, kl: Array | float, n_steps: int | Array) -> FixedKL:
        """Returns the state unchanged."""
        del kl, n_steps
        return self


@flax.struct.dataclass
class AdaptiveKL:
    """Ziegler et al. (2019) proportional controller that steers the observed KL to `target`.

    `kl` passed to `update` should be the same quantity as `target`: usually the mean over
    responses of the summed per-token KL. `n_steps` is how many samples (or steps) the observed
    KL covers; `horizon` sets how fast the coefficient moves.
    """

    coef: Array | float
    target: float = flax.struct.field(pytree_node=False, default=6.0)
    horizon: float = flax.struct.field(pytree_node=False, default=10000.0)

    def __post_init__(self):
        if not (self.target > 0 and self.horizon > 0):
            raise ValueError(f"AdaptiveKL needs target > 0 and horizon > 0, got {self}")

    def update(self, kl: Array | float, n_steps: int | Array) -> AdaptiveKL:
        """coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""
        error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
        return self.replace(coef=self.coef * (1.0 + error * n_steps / self.horizon))


def update(state: FixedKL | AdaptiveKL, kl: Array | float, n_steps: int | Array):
    """Pure controller step: the state after observing `kl` over `n_steps`."""
    return state.update(kl, n_steps)
