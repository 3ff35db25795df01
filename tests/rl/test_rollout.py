"""Rollout rows and buffers (PPO, GRPO, EI, pairs), and the producer: log-probs, resume, and
two real JAX processes sharing one rollout."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data.tasks.base import Problem
from model import sampler, transformer
from model.config import get_preset
from rl import buffers as B
from rl import rollout as rollout_lib
from rl.rewards import Scored
from tests.conftest import REPO, free_port, subprocess_env
from train.configs import rl as rl_configs

PAD = 0


class FakeTokenizer:
    pad_id = PAD
    eot_id = 2

    def decode(self, ids):
        return " ".join(map(str, ids))


PROBLEM = Problem("addition", "q", "1", "h", ("s",), "s", "Answer: 1")


def toy_rollout(prompt_lengths, response_lengths, group_size, length=12, t=4):
    """A laid-out rollout with tokens 10 + j at response column j."""
    prompts = [[1] * p for p in prompt_lengths]
    tokens_RxT = np.full((len(prompts), t), PAD, np.int32)
    for r, n in enumerate(response_lengths):
        tokens_RxT[r, :n] = 10 + np.arange(n)
    lengths = np.asarray(response_lengths, np.int32)
    finished = lengths < t
    return rollout_lib.layout(
        FakeTokenizer(),
        [PROBLEM] * len(prompts),
        prompts,
        tokens_RxT,
        lengths,
        finished,
        group_size,
        length,
    )


def scored(rewards_R, correct_R, rollout):
    """Sequence rewards on each row's last generated token."""
    from rl.rewards import terminal

    responses = rollout.responses
    rewards_RxT = terminal(
        np.asarray(rewards_R, np.float32), responses.lengths_R, responses.num_tokens
    )
    return Scored(rewards_RxT, {}, np.asarray(correct_R, np.float32))


def test_layout_aligns_the_response_mask_with_generated_targets():
    r = toy_rollout([3, 5], [4, 2], group_size=2)
    mask, targets = r.response_mask_RxL, r.targets_RxL
    np.testing.assert_array_equal(targets[0][mask[0] > 0], [10, 11, 12, 13])
    np.testing.assert_array_equal(targets[1][mask[1] > 0], [10, 11])
    np.testing.assert_array_equal(np.flatnonzero(mask[1]), [4, 5])  # prompt length 5: from 4
    np.testing.assert_array_equal(r.segment_ids_RxL.sum(axis=1), [7, 7])
    assert r.responses.texts[1] == "10"  # a finished row drops its stop token from the text


def test_to_positions_moves_response_columns_to_target_positions():
    x = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    out = B.to_positions(x, np.array([2, 10]), 12)
    np.testing.assert_array_equal(out[0, 1:5], [1, 2, 3, 4])
    np.testing.assert_array_equal(out[1, 9:], [5, 6, 7])  # the column past L is dropped
    assert out.sum() == 10 + 18


def test_ppo_buffer_is_gae_of_token_rewards_minus_kl():
    r = toy_rollout([3, 3], [3, 2], group_size=2)
    r = B.dataclasses.replace(r, old_logprobs_RxL=-r.response_mask_RxL)  # log p = -1, ref = 0
    s = scored([1.0, 0.0], [1, 0], r)
    kwargs = dict(estimator="k1", gamma=1.0, lam=1.0, whiten=False)
    no_kl = B.ppo_buffer(r, s, kl_coef=0.1, kl_in_reward=False, **kwargs)
    mask = r.response_mask_RxL
    # gamma = lam = 1 with zero values: every token's advantage is the reward to go.
    np.testing.assert_allclose(no_kl["advantages"][0][mask[0] > 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(no_kl["returns"], no_kl["advantages"])
    np.testing.assert_allclose(no_kl["kl_coef"], [0.1, 0.1])  # KL goes into the loss
    in_reward = B.ppo_buffer(r, s, kl_coef=0.1, kl_in_reward=True, **kwargs)
    # k1 = logp - ref = -1 per token: a penalty of -0.1 * -1 = +0.1 per remaining token.
    np.testing.assert_allclose(in_reward["advantages"][0][mask[0] > 0], [1.3, 1.2, 1.1], rtol=1e-6)
    np.testing.assert_array_equal(in_reward["kl_coef"], [0.0, 0.0])
    assert np.all(in_reward["advantages"][mask == 0] == 0.0)
    whitened = B.ppo_buffer(r, s, kl_coef=0.0, kl_in_reward=True, **{**kwargs, "whiten": True})
    np.testing.assert_allclose(whitened["advantages"][mask > 0].mean(), 0.0, atol=1e-6)


def test_grpo_buffer_gives_each_row_its_group_relative_advantage():
    r = toy_rollout([3] * 4, [2, 3, 1, 2], group_size=2)
    s = scored([1.0, 0.0, 0.5, 0.5], [1, 0, 0, 0], r)
    buf = B.grpo_buffer(r, s, kl_coef=0.0, kl_in_reward=True, estimator="k1", normalize_std=True)
    per_row = [
        np.unique(a[m > 0]) for a, m in zip(buf["advantages"], r.response_mask_RxL, strict=True)
    ]
    np.testing.assert_allclose(np.concatenate(per_row), [1.0, -1.0, 0.0, 0.0], atol=1e-5)
    assert "old_values" not in buf and buf["inputs"].shape == (4, 12)


def test_expert_iteration_keeps_correct_rows_cycled_to_the_batch():
    r = toy_rollout([3] * 4, [2, 3, 1, 2], group_size=2)
    buf = B.ei_buffer(r, scored([0] * 4, [0, 1, 1, 0], r), multiple=4)
    np.testing.assert_array_equal(buf["inputs"], r.responses.inputs_RxL[[1, 2, 1, 2]])
    assert B.ei_buffer(r, scored([0] * 4, [0] * 4, r), multiple=4) == {}


def test_pairs_are_correct_vs_wrong_within_a_prompt():
    # Group 1 is all correct; groups 0 and 2 pair their correct rows with wrong ones in order.
    pairs = B.preference_pairs(np.array([1, 0, 0, 1, 1, 1, 0, 1, 0]), group_size=3)
    np.testing.assert_array_equal(pairs, [[0, 1], [7, 6]])
    r = toy_rollout([3] * 4, [2, 3, 1, 2], group_size=2)
    r = B.dataclasses.replace(r, ref_logprobs_RxL=-r.response_mask_RxL)
    buf = B.pair_buffer(r, scored([0] * 4, [0, 1, 1, 1], r), multiple=2)
    assert buf["inputs"].shape == (2, 2, 12)
    np.testing.assert_array_equal(buf["ref_logp"], [[-3.0, -2.0], [-3.0, -2.0]])
    assert B.pair_buffer(r, scored([0] * 4, [1, 1, 0, 0], r), multiple=2) == {}


# ---------------------------------------------------------------------- the producer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny RL config, prepared data, a value-head model and a reference checkpoint."""
    from data.build import prepare
    from train import checkpoint
    from train.step import TrainState

    workdir = str(tmp_path_factory.mktemp("rollout"))
    config = rl_configs.get_config("tiny,algo=ppo")
    config.data.train_size, config.data.test_size, config.data.validation_size = 16, 2, 2
    config.rl.prompts, config.rl.group_size, config.rl.max_new_tokens = 4, 2, 6
    config.rl.epochs, config.batch_size, config.rl.forward_batch = 2, 4, 4
    prepared = prepare(config.data, workdir, verbose=False)
    cfg = get_preset("tiny", vocab_size=prepared.tokenizer.vocab_size, max_seq_len=512)
    model = transformer.Transformer(cfg, heads=("value",))
    params = transformer.init_params(cfg, jax.random.PRNGKey(1), heads=("value",))
    # A nonzero value head, whatever its init, so that the old values are visible in batches.
    kernel_Dx1 = params["value_head"]["kernel"]
    params["value_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), kernel_Dx1.shape)
    ref_dir = str(tmp_path_factory.mktemp("ref"))
    state = TrainState(step=np.int32(0), params=params, opt_state={}, rng=jax.random.PRNGKey(0))
    with checkpoint.make_manager(ref_dir, keep=1, async_save=False) as manager:
        checkpoint.save(manager, 1, state, ocp.args.JsonSave({}))
    config.init_from = ref_dir
    return types.SimpleNamespace(
        config=config, prepared=prepared, model=model, params=params, workdir=workdir
    )


def producer(setup, kind="ppo"):
    return rollout_lib.RolloutProducer(setup.config, setup.prepared, setup.model, kind)


def state_of(params):
    return types.SimpleNamespace(params=params)


def test_producer_batches_carry_aligned_logprobs_values_and_reference(setup):
    p = producer(setup)
    batch = p.next(state_of(setup.params))
    assert batch["inputs"].shape == (4, setup.config.data.seq_len)
    mask = batch["response_mask"]
    assert mask.sum() > 0
    # old_logprobs[t] is log p(inputs[t + 1]): sampler.score's value at t + 1.
    scores = np.asarray(
        sampler.score(setup.params, setup.model.cfg, batch["inputs"], batch["segment_ids"])
    )
    np.testing.assert_allclose(
        batch["old_logprobs"][:, :-1], (scores[:, 1:] * mask[:, :-1]), atol=2e-5
    )
    # The reference checkpoint holds the same trunk: KL 0 and identical log-probs.
    np.testing.assert_allclose(batch["ref_logprobs"], batch["old_logprobs"], atol=1e-6)
    assert np.all(batch["old_values"][mask == 0] == 0.0) and np.any(batch["old_values"] != 0.0)
    metrics = p.host_metrics()
    assert metrics["rollout/kl_ref"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rollout/reward", "rollout/accuracy", "rollout/response_tokens", "time/rollout"):
        assert key in metrics


def test_reference_stays_frozen_while_the_policy_moves(setup):
    p = producer(setup, "grpo")
    moved = jax.tree.map(lambda x: x * 1.5, setup.params)
    batch = p.next(state_of(moved))
    mask = batch["response_mask"] > 0
    assert np.abs(batch["ref_logprobs"][mask] - batch["old_logprobs"][mask]).max() > 1e-3
    assert p.host_metrics()["rollout/kl_ref"] != 0.0


def test_snapshot_restores_the_exact_batch_stream(setup, tmp_path):
    params = setup.params
    first = producer(setup)
    for _ in range(3):  # into the second epoch of the first rollout (2 minibatches per epoch)
        first.next(state_of(params))
    with ocp.CheckpointManager(str(tmp_path), item_names=("data",)) as manager:
        manager.save(1, args=ocp.args.Composite(data=first.save_args()))
        manager.wait_until_finished()
        expected = [first.next(state_of(params)) for _ in range(3)]  # crosses into rollout 2
        second = producer(setup)
        manager.restore(1, args=ocp.args.Composite(data=second.restore_args()))
    assert second.position == rollout_lib.Position(rollout=1, epoch=1, minibatch=1)
    resumed = [second.next(state_of(params)) for _ in range(3)]
    for a, b in zip(expected, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert second.position.rollout == 2


def test_rollouts_walk_the_split_and_reject_bad_sizes(setup):
    p = producer(setup)
    seen = np.concatenate([p._prompt_indices(k) for k in range(4)])
    assert sorted(seen) == list(range(16))  # one pass over the 16 train prompts
    setup.config.batch_size = 3
    try:
        with pytest.raises(ValueError, match="does not split into minibatches"):
            producer(setup)
    finally:
        setup.config.batch_size = 4


def test_selection_without_any_correct_response_fails_clearly(setup, monkeypatch):
    from rl import rewards

    monkeypatch.setattr(rewards, "verify_response", lambda problem, text: 0.0)
    setup.config.rl.max_empty_rollouts = 2
    p = producer(setup, "ei")
    with pytest.raises(RuntimeError, match="2 rollouts in a row gave no training rows"):
        p.next(state_of(setup.params))
    assert p.position.rollout == 2


# Each process: join the run, restore the policy into a (2, 2, 1) mesh spanning both, roll out.
CHILD = textwrap.dedent(
    """
    import json, sys, types
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    address, index, config_json, workdir = sys.argv[1:]
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=int(index))
    import ml_collections
    from data.build import prepare
    from model import sharding, transformer
    from model.config import get_preset
    from rl import rollout
    from train import checkpoint
    from train.state import param_shardings
    config = ml_collections.ConfigDict(json.loads(config_json))
    prepared = prepare(config.data, workdir, verbose=False)
    cfg = get_preset("tiny", vocab_size=prepared.tokenizer.vocab_size, max_seq_len=512)
    model = transformer.Transformer(cfg, heads=("value",))
    mesh = sharding.make_mesh((2, 2, 1))
    abstract, shardings = param_shardings(model, mesh, sharding.get_rules("fsdp"))
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params, _ = checkpoint.load_params(config.init_from, abstract)
    with sharding.use_rules(mesh, "fsdp"):
        producer = rollout.RolloutProducer(config, prepared, model, "ppo")
        producer.next(types.SimpleNamespace(params=params))
    buffer = {key: value.tolist() for key, value in producer.buffer.items()}
    print("ROLLOUT", json.dumps([buffer, producer.host_metrics(), producer.controller.coef]))
    """
)


def test_two_processes_split_one_rollout(setup):
    config = setup.config
    address = f"127.0.0.1:{free_port()}"
    env = subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, address, str(i), config.to_json(), setup.workdir],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        line = next(line for line in stdout.splitlines() if line.startswith("ROLLOUT "))
        outputs.append(json.loads(line.removeprefix("ROLLOUT ")))

    # One process with the whole rollout: each process holds its half of that buffer.
    expected = producer(setup)
    expected.next(state_of(setup.params))
    (first, metrics_0, coef_0), (second, metrics_1, coef_1) = outputs
    for key, value in expected.buffer.items():
        got = np.concatenate([np.asarray(first[key]), np.asarray(second[key])])
        assert len(first[key]) == len(second[key]) == len(value) // 2
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=2e-5, err_msg=key)
    timeless = [key for key in expected.host_metrics() if not key.startswith("time/")]
    for key in timeless:  # the rollout's statistics, over every process's rows
        assert metrics_0[key] == metrics_1[key], key
        assert metrics_0[key] == pytest.approx(expected.host_metrics()[key], abs=1e-5), key
    assert coef_0 == coef_1 == pytest.approx(float(expected.controller.coef))
