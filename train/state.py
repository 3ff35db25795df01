"""Building the train state sharded from the start.

The path is the one STYLE.md asks for: `jax.eval_shape` of the init gives shapes and the
logical axes of every parameter; the rules table turns those into shardings; a jitted init
with `out_shardings` then creates each array directly in its shards. Parameters are never
materialized whole on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from model import sharding as sharding_lib
from train.step import TrainState


def dummy_tokens(batch: int = 1, length: int = 8):
    """Int32 tokens with the shape the init traces with."""
    return jnp.zeros((batch, length), jnp.int32)


def param_shardings(model, mesh, rules):
    """(abstract params, their NamedShardings) from the model's logical axis names."""
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy_tokens())["params"]
    return sharding_lib.unbox(boxed), sharding_lib.logical_to_sharding(boxed, mesh, rules)


def opt_state_shardings(abstract_opt_state, abstract_params, shardings, mesh):
    """Shardings for the optimizer state: each moment follows its parameter.

    Optax keeps moments in trees shaped like the parameters, so a state leaf whose key path
    ends with a parameter's path (and has its shape) takes that parameter's sharding;
    counters and other scalars are replicated.
    """
    by_path = {}
    for (path, p), (_, s) in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        jax.tree_util.tree_flatten_with_path(shardings)[0],
        strict=True,
    ):
        by_path[tuple(path)] = (p.shape, s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def follow(path, leaf):
        for start in range(len(path)):
            shape_and_sharding = by_path.get(tuple(path[start:]))
            if shape_and_sharding and shape_and_sharding[0] == leaf.shape:
                return shape_and_sharding[1]
        return replicated

    return jax.tree_util.tree_map_with_path(follow, abstract_opt_state)


def state_shardings(abstract_params, p_shardings, tx, mesh):
    """(abstract TrainState, TrainState of shardings) for parameters sharded as given."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=p_shardings,
        opt_state=opt_state_shardings(abstract_opt, abstract_params, p_shardings, mesh),
        rng=replicated,
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def init_state(model, tx, seed: int, shardings: TrainState, params=None) -> TrainState:
    """A fresh TrainState created in its shards.

    `params` (a dict of top-level parameter parts, already placed, e.g. a loaded trunk)
    replace those parts of the fresh init; XLA drops their unused initializers, so only the
    rest (new heads) is computed and compiled.
    """

    def make(rng, given):
        init_rng, state_rng = jax.random.split(rng)
        fresh = sharding_lib.unbox(model.init(init_rng, dummy_tokens())["params"])
        params = {**fresh, **given}
        return TrainState(
            step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=state_rng
        )

    given = {} if params is None else dict(params)
    return jax.jit(make, out_shardings=shardings, donate_argnums=1)(jax.random.PRNGKey(seed), given)
