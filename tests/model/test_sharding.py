"""Sharded init and training math on 8 forced CPU devices equal the single-device results."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import sampler, sharding, transformer
from model.transformer import Transformer

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)"
)


def _loss(cfg, params, tokens_BxL):
    """Next-token cross-entropy."""
    logits_BxLxV = Transformer(cfg).apply({"params": params}, tokens_BxL)
    logprobs_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1])
    picked_BxL = jnp.take_along_axis(logprobs_BxLxV, tokens_BxL[:, 1:, None], axis=-1)
    return -jnp.mean(picked_BxL)


def _logits_and_grads(cfg, params, tokens_BxL):
    logits_BxLxV = Transformer(cfg).apply({"params": params}, tokens_BxL)
    return logits_BxLxV, jax.grad(functools.partial(_loss, cfg))(params, tokens_BxL)


def test_make_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sharding.make_mesh((2, -1, 2)).shape)["fsdp"] == 2
    with pytest.raises(ValueError, match="there are 8"):
        sharding.make_mesh((2, 2, 1))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 2))


def test_rules_fall_back_when_sizes_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 8}
    spec = sharding.logical_to_spec(("embed", "heads", "kv"), (32, 4, 8), mesh_shape, "fsdp_tp")
    assert spec == P("fsdp", None, "tensor")  # 4 heads cannot split 8 ways; head_dim can
    spec = sharding.logical_to_spec(("batch", "length"), (2, 16), mesh_shape, "fsdp_tp")
    assert spec == P("data", None)  # 2 rows: the longest prefix of (data, fsdp) that divides
    spec = sharding.logical_to_spec(("batch", "length", "embed"), (8, 16, 32), mesh_shape, "fsdp")
    assert spec == P(("data", "fsdp"), None, None)  # fsdp is taken by the batch
    with pytest.raises(ValueError, match="unknown sharding rules"):
        sharding.get_rules("zero3")
    with pytest.raises(ValueError, match="unknown logical axes"):
        sharding.get_rules((("hidden", "tensor"),))


@pytest.fixture(scope="module")
def tokens_and_expected(tiny_cfg, tiny_params):
    """A batch, and its logits and gradients computed on one device."""
    tokens_BxL = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 1, tiny_cfg.vocab_size)
    logits, grads = jax.jit(_logits_and_grads, static_argnums=0)(tiny_cfg, tiny_params, tokens_BxL)
    return tokens_BxL, logits, grads


@pytest.mark.parametrize(
    "mesh_shape, rules",
    [
        ((8, 1, 1), "dp"),
        ((2, 4, 1), "fsdp"),
        ((2, 2, 2), "fsdp_tp"),
        ((1, 1, 8), "fsdp_tp"),
        ((2, 1, 4), "sample"),
    ],
)
def test_sharded_logits_and_grads_equal_single_device(
    tiny_cfg, tiny_params, tokens_and_expected, mesh_shape, rules
):
    tokens_BxL, expected_logits, expected_grads = tokens_and_expected
    mesh = sharding.make_mesh(mesh_shape)
    params, specs = sharding.init_sharded(
        functools.partial(transformer.init_variables, tiny_cfg),
        jax.random.PRNGKey(0),
        mesh=mesh,
        rules=rules,
    )
    # Initialized straight into shards, yet the same numbers as on one device.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), tiny_params)
    assert specs["layers"]["mlp"]["gate"]["kernel"] == P("layers", "embed", "mlp")
    assert specs["embed"]["embedding"] == P("vocab", "embed")
    tokens_BxL = jax.device_put(tokens_BxL, sharding.batch_sharding(mesh, rules, (8, 16)))
    with sharding.use_rules(mesh, rules):
        logits, grads = jax.jit(_logits_and_grads, static_argnums=0)(tiny_cfg, params, tokens_BxL)

    np.testing.assert_allclose(logits, expected_logits, atol=2e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6), grads, expected_grads)

    def shard_shape(x):
        return x.addressable_shards[0].data.shape

    assert shard_shape(tokens_BxL)[0] < 8 or mesh_shape[0] * mesh_shape[1] == 1
    gate = params["layers"]["mlp"]["gate"]["kernel"]
    embedding = params["embed"]["embedding"]
    if rules == "dp":
        assert shard_shape(gate) == gate.shape and shard_shape(embedding) == embedding.shape
    else:  # the big kernels really are split
        for x in (gate, params["layers"]["mlp"]["down"]["kernel"], embedding):
            assert np.prod(shard_shape(x)) < x.size


def test_sharded_greedy_sampling_equals_single_device(tiny_cfg, tiny_params):
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2], [42, 7, 7, 100, 8]]
    kwargs = {"rng": jax.random.PRNGKey(0), "max_new_tokens": 6, "stop_tokens": (), "greedy": True}
    expected = sampler.sample(tiny_params, tiny_cfg, prompts, **kwargs)
    mesh = sharding.make_mesh((2, 1, 4))
    params, _ = sharding.init_sharded(
        functools.partial(transformer.init_variables, tiny_cfg),
        jax.random.PRNGKey(0),
        mesh=mesh,
        rules="sample",
    )
    with sharding.use_rules(mesh, "sample"):
        got = sampler.sample(params, tiny_cfg, prompts, **kwargs)
    np.testing.assert_array_equal(got.tokens_BxNxT, expected.tokens_BxNxT)
    np.testing.assert_allclose(got.logprobs_BxNxT, expected.logprobs_BxNxT, atol=1e-5)
