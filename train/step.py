"""The train state and the pure train step that every objective shares."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, parameters, optimizer state, rng."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; each step folds in its step number


def split_microbatches(batch, accum_steps: int):
    """[A*b, ...] arrays -> [A, b, ...], so a scan can walk the microbatches."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into {accum_steps} microbatches"
            )
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, loss_fn, tx, schedule, accum_steps: int):
    """One optimizer step: gradients averaged over `accum_steps` microbatches, then AdamW.

    Pure: bind the keyword arguments with functools.partial and jit it once.
    Returns the new state and the step's metrics (device scalars).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro):
        grads_sum, metrics_sum, index = carry
        (loss, metrics), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
        metrics = {"loss": loss, **metrics}
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        metrics_sum = jax.tree.map(jnp.add, metrics_sum, metrics)
        return (grads_sum, metrics_sum, index + 1), None

    micro = split_microbatches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: {"loss": 0.0, **loss_fn(state.params, first, rng)[1]})
    zeros = (
        jax.tree.map(jnp.zeros_like, state.params),
        jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metrics_shape),
        jnp.int32(0),
    )
    (grads, metrics, _), _ = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    metrics = jax.tree.map(lambda m: m / accum_steps, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
