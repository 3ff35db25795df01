"""Every objective trains the same on any mesh: 3 steps sharded equal 3 steps on one device.

The harness builds a run the way train/loop.py does (state shardings from the rules, sharded
init, the jitted pure step, batches placed by `batches.to_global`, the rules active while
the step and any rollout trace) and compares every step's metrics (the loss among them) and
the updated parameters with the same run on a one-device mesh, on 8 forced CPU devices.
Objectives whose modules have not landed are skipped with the reason.

The one-device run of each objective is made once per test run and compared with every mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import numpy as np
import optax
import pytest

from model import sharding as sharding_lib
from tests.conftest import build_once, tiny_config
from train import batches as batches_lib
from train import init_from, loop
from train.objectives import OBJECTIVES, get_objective
from train.optim import make_optimizer
from train.state import init_state, param_shardings, state_shardings
from train.step import train_step

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)"
)

NUM_STEPS = 3
# Objective -> (config module in train/configs, its tiny variant).
CONFIGS = {
    "sft": ("sft", "tiny"),
    "orm": ("rm", "kind=orm,tiny"),
    "prm": ("rm", "kind=prm,tiny"),
    "ppo": ("rl", "algo=ppo,tiny"),
    "grpo": ("rl", "algo=grpo,tiny"),
}
# Mesh (data, fsdp, tensor) -> the rule set that exercises it.
MESHES = {(8, 1, 1): "dp", (2, 4, 1): "fsdp", (2, 2, 2): "fsdp_tp", (1, 2, 4): "fsdp_tp"}
# (objective, mesh) pairs: every mesh for SFT; pairs of objectives that differ by little
# split the meshes between them, so that each mesh still runs one of each kind.
# ORM and PRM are one model (the reward head on the same data) whose losses read different
# tokens. PPO and GRPO share the sampler, the scoring forwards and the clipped policy loss;
# PPO adds the value head and its loss. GRPO's advantages compare the samples of a group,
# rows that the data axis spreads over devices: it takes the meshes with the most data
# shards. PPO takes the tensor-parallel ones, where its value head reads hidden states of a
# model whose heads, MLPs and vocabulary are split, and its kernel is split over fsdp.
SPLIT_MESHES = {
    "orm": [(8, 1, 1), (2, 2, 2)],
    "prm": [(2, 4, 1), (1, 2, 4)],
    "grpo": [(8, 1, 1), (2, 4, 1)],
    "ppo": [(2, 2, 2), (1, 2, 4)],
}
CASES = [
    (name, mesh)
    for name in CONFIGS
    for mesh in (SPLIT_MESHES[name] if name in SPLIT_MESHES else MESHES)
]
SIGNAL_REWARD = "test_even_token_share"  # registered in rl.rewards by add_signal_reward


@dataclasses.dataclass
class Trained:
    """What a few steps produced: each step's metrics (loss, grad_norm, lr...) and the params."""

    metrics: list[dict[str, float]]
    params: dict


def objective_config(name: str, request):
    """The objective's tiny config (SFT-initialized unless SFT); skips if it has not landed."""
    module, variant = CONFIGS[name]
    if name not in OBJECTIVES:
        pytest.skip(f"objective {name!r} is not registered yet (train/objectives)")
    if get_objective(name).batches not in batches_lib.PRODUCERS:
        pytest.skip(f"batch producer {get_objective(name).batches!r} is not registered yet")
    config = importlib.import_module(f"train.configs.{module}").get_config(variant)
    config.unlock()
    if name != "sft":
        config.init_from = request.getfixturevalue("tiny_run")
    if name in ("ppo", "grpo"):
        add_signal_reward(config)
    return config


def add_signal_reward(config) -> None:
    """Adds a reward that differs between samples to an RL config.

    The tiny policy solves nothing, so every sample of a group would get the same reward:
    GRPO's advantages vanish and its gradient is round-off, which Adam scales up to the
    learning rate in a direction that noise picks. A varying reward gives a real signal.
    """
    from rl import rewards

    def even_token_share(responses, correct_R):
        del correct_R
        T = responses.num_tokens
        valid_RxT = np.arange(T)[None, :] < responses.lengths_R[:, None]
        even_RxT = (responses.tokens_RxT % 2 == 0) & valid_RxT
        share_R = even_RxT.sum(axis=1) / np.maximum(responses.lengths_R, 1)
        return rewards.terminal(share_R.astype(np.float32), responses.lengths_R, T)

    rewards.REWARDS.setdefault(SIGNAL_REWARD, lambda rl_config, tokenizer: (even_token_share, True))
    config.rl.rewards[SIGNAL_REWARD] = 1.0


def train_steps(config, setup: loop.Setup, mesh, rules: str) -> Trained:
    """NUM_STEPS steps of `config.objective` on `mesh`, set up as train.loop.run does."""
    objective = get_objective(config.objective)
    setup = dataclasses.replace(setup, mesh=mesh, rules=sharding_lib.get_rules(rules))
    model = setup.model
    producer = batches_lib.make_producer(objective.batches, config, setup.prepared, model)
    abstract_params, p_shardings = param_shardings(model, mesh, setup.rules)
    tx, schedule = make_optimizer(config.optimizer, config.num_steps, abstract_params)
    abstract, shardings = state_shardings(abstract_params, p_shardings, tx, mesh)
    source = init_from.find_source(config.init_from)
    trunk = None
    if source is not None:
        trunk = init_from.load_params(source, setup.model_cfg, abstract.params)
    state = init_state(model, tx, config.seed, shardings, params=trunk)
    step_fn = jax.jit(
        functools.partial(
            train_step,
            loss_fn=objective.make_loss(config, model),
            tx=tx,
            schedule=schedule,
            accum_steps=config.grad_accum_steps,
        ),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    history = []
    with sharding_lib.use_rules(mesh, setup.rules):
        for _ in range(NUM_STEPS):
            batch = batches_lib.to_global(producer.next(state), mesh, setup.rules)
            state, metrics = step_fn(state, batch)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return Trained(history, jax.device_get(state.params))


@pytest.fixture(scope="module")
def prepared_runs(tmp_path_factory):
    """Per objective: its Setup (data, tokenizer, model), built once per xdist worker, and its
    one-device steps, made once per test run (tests/conftest.py:build_once). Every worker
    builds the same data from the config's seed, and starts the others from the same SFT
    run: a CPU run is reproducible bit for bit (tests/train/test_resume.py)."""
    cache = {}

    def get(name: str, config) -> tuple[loop.Setup, Trained]:
        if name not in cache:
            workdir = str(tmp_path_factory.mktemp(f"equivalence_{name}"))
            setup = loop.build(config, workdir)  # its mesh is replaced in train_steps
            one_device = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
            expected = build_once(
                tmp_path_factory,
                f"equivalence_{name}_one_device",
                lambda _: train_steps(config, setup, one_device, "fsdp"),
            )
            cache[name] = setup, expected
        return cache[name]

    return get


def test_every_mesh_runs_every_kind_of_objective():
    for group in (("sft",), ("orm", "prm"), ("ppo", "grpo")):
        assert {mesh for name, mesh in CASES if name in group} == set(MESHES), group


@pytest.mark.parametrize(
    "name, mesh_shape", CASES, ids=[f"{n}-{'x'.join(map(str, m))}" for n, m in CASES]
)
def test_sharded_steps_equal_one_device(name, mesh_shape, request, prepared_runs):
    config = objective_config(name, request)
    setup, expected = prepared_runs(name, config)
    got = train_steps(config, setup, sharding_lib.make_mesh(mesh_shape), MESHES[mesh_shape])

    assert all(np.isfinite(m["loss"]) for m in expected.metrics)
    assert max(m["grad_norm"] for m in expected.metrics) > 1e-4, "no gradient signal to compare"
    for step, (got_m, expected_m) in enumerate(zip(got.metrics, expected.metrics, strict=True)):
        assert got_m.keys() == expected_m.keys()
        for key, value in expected_m.items():  # the loss and all the objective's metrics
            message = f"{key} at step {step + 1}"
            np.testing.assert_allclose(got_m[key], value, rtol=1e-5, atol=1e-6, err_msg=message)
    # Parameters get 2e-5 of absolute slack: Adam divides each update by the root of its own
    # second moment, so an embedding row whose token barely occurs, with a gradient near
    # zero, turns the different reduction orders of a sharded step into a ~1e-5 difference
    # (GRPO on 1x2x4: 1 of 16384 embedding entries, after the block-causal attention).
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
        got.params,
        expected.params,
    )


def adam_states(opt_state) -> list[optax.ScaleByAdamState]:
    """Every Adam moment state inside an optax state tree."""

    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


def test_adam_moments_follow_parameter_shardings():
    from model.config import get_preset
    from model.transformer import Transformer

    model = Transformer(get_preset("tiny"))
    mesh = sharding_lib.make_mesh((2, 2, 2))
    rules = sharding_lib.get_rules("fsdp_tp")
    abstract_params, p_shardings = param_shardings(model, mesh, rules)
    tx, _ = make_optimizer(tiny_config().optimizer, 10, abstract_params)
    _, shardings = state_shardings(abstract_params, p_shardings, tx, mesh)
    state = init_state(model, tx, 0, shardings)

    (adam,) = adam_states(state.opt_state)
    for moments in (adam.mu, adam.nu):
        specs = jax.tree.map(lambda x: x.sharding.spec, moments)
        assert specs == jax.tree.map(lambda x: x.sharding.spec, state.params)
    kernel = adam.mu["layers"]["mlp"]["gate"]["kernel"]
    assert kernel.addressable_shards[0].data.size < kernel.size  # really split, not replicated
    assert adam.count.sharding.is_fully_replicated
