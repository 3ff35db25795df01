"""Tiny RL runs through the real loop: PPO and GRPO learn a toy reward; EI, DPO and ORPO run."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rl import rewards as R
from tests.conftest import apply_overrides, build_once
from train import checkpoint
from train import workdir as workdir_lib
from train.configs import rl as rl_configs
from train.loop import run
from train.metrics import read_metrics

TARGET_MASS = 0.1  # how often the initial policy starts a response with a target token


def make_policy_workdir(workdir: str) -> str:
    """A stand-in finished SFT run (rl/stages.py reuses it): tokenizer, data, config.json,
    eval.json and the final checkpoint of a random tiny model."""
    from data.build import prepare
    from model.transformer import init_params
    from train.step import TrainState

    config = policy_config("ppo", "")
    prepared = prepare(config.data, workdir, verbose=False)
    model_cfg = workdir_lib.resolve_model_config(config.model, prepared.tokenizer.vocab_size)
    config.objective, config.num_steps = "sft", 1
    workdir_lib.write_config(workdir, workdir_lib.resolved_config(config, model_cfg))
    params = init_params(model_cfg, jax.random.PRNGKey(7))
    state = TrainState(step=np.int32(0), params=params, opt_state={}, rng=jax.random.PRNGKey(0))
    with checkpoint.make_manager(workdir, keep=1, async_save=False) as manager:
        checkpoint.save(manager, 1, state, ocp.args.JsonSave({}))
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump({"step": 1}, f)
    return workdir


def policy_config(algo: str, init_from: str, **overrides):
    """The `rl.py:tiny` config with 32 train prompts, without the before/after table."""
    config = rl_configs.get_config(f"tiny,algo={algo}")
    config.init_from = init_from
    config.data.train_size, config.data.validation_size, config.data.test_size = 32, 4, 4
    config.rl.compare.table = False
    return apply_overrides(config, overrides)


def shared_policy_workdir(tmp_path_factory) -> str:
    """A make_policy_workdir run made once per test run (tests/conftest.py:build_once); the
    runs that start from it only read it."""
    return build_once(tmp_path_factory, "policy", lambda folder: make_policy_workdir(str(folder)))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    return shared_policy_workdir(tmp_path_factory)


def first_token_probs(workdir: str) -> np.ndarray:
    """The policy's mean next-token distribution after its train prompts, [V]."""
    from data.build import prepare
    from data.builder import load_split
    from model.sampler import pad_prompts
    from model.transformer import Transformer
    from rl.generate import user_prompt_tokens
    from train.workdir import load_run

    policy = load_run(workdir)
    split = load_split(prepare(policy.config.data, workdir, verbose=False).builder, "train")
    prompts = [user_prompt_tokens(policy.tokenizer, split[i]["prompt"]) for i in range(len(split))]
    tokens_BxP, lengths_B = pad_prompts(prompts, policy.tokenizer.pad_id)
    segment_ids_BxP = (np.arange(tokens_BxP.shape[1]) < lengths_B[:, None]).astype(np.int32)
    logits_BxPxV = Transformer(policy.model_cfg).apply(
        {"params": policy.params}, tokens_BxP, None, segment_ids_BxP
    )
    last_BxV = np.asarray(logits_BxPxV)[np.arange(len(prompts)), lengths_B - 1]
    return np.asarray(jax.nn.softmax(last_BxV, axis=-1)).mean(axis=0)


def make_toy_reward(workdir: str):
    """1 when a response starts with a target token: the initial policy's likeliest first
    tokens, few enough that it starts with one only ~10% of the time."""
    probs_V = first_token_probs(workdir)
    order = np.argsort(-probs_V)
    targets = order[: int(np.searchsorted(np.cumsum(probs_V[order]), TARGET_MASS)) + 1]

    def toy_reward(responses: R.Responses, correct_R: np.ndarray) -> np.ndarray:
        del correct_R
        scores_R = np.isin(responses.tokens_RxT[:, 0], targets).astype(np.float32)
        return R.terminal(scores_R, responses.lengths_R, responses.num_tokens)

    return toy_reward


ROLLOUTS, STEPS_PER_ROLLOUT = 12, 4  # 2 epochs x 2 minibatches of 16 rows


@pytest.mark.usefixtures("one_device_loop")  # PPO and GRPO on meshes: test_mesh_equivalence
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_policy_gradient_learns_a_toy_reward(algo, policy_dir, tmp_path, monkeypatch, capsys):
    toy_reward = make_toy_reward(policy_dir)
    monkeypatch.setitem(R.REWARDS, "toy", lambda rl_config, tokenizer: (toy_reward, True))
    steps = ROLLOUTS * STEPS_PER_ROLLOUT
    config = policy_config(
        algo,
        policy_dir,
        **{
            "rl.rewards": {"toy": 1.0},
            "rl.max_new_tokens": 2,
            "rl.prompts": 8,
            "rl.group_size": 4,
            "rl.epochs": 2,
            "batch_size": 16,
            "num_steps": steps,
            "checkpoint_every": steps,
            "optimizer.lr": 1e-2,
            "eval.num_problems": 2,
            "eval.max_new_tokens": 2,
            "rl.compare.table": algo == "grpo",
        },
    )
    result = run(config, str(tmp_path))
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # The first minibatch sees the sampling parameters: the sampler's log-probs are the loss's.
    assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert records[0]["approx_kl"] == pytest.approx(0.0, abs=1e-5)
    rewards = [r["rollout/reward"] for r in records[::STEPS_PER_ROLLOUT]]  # one per rollout
    assert rewards[0] < 0.3, rewards  # the initial policy rarely starts with a target token
    assert np.mean(rewards[-3:]) > max(0.6, rewards[0] + 0.4), rewards
    for r in records:
        assert math.isfinite(r["loss"]) and r["kl_ref"] >= 0.0
        assert 0.0 <= r["clip_fraction"] <= 1.0
    assert records[-1]["rollout/kl_ref"] > 0.0  # the policy moved away from the reference
    if algo == "ppo":
        assert "value_loss" in records[-1] and "explained_variance" in records[-1]
        assert set(result) == {"accuracy", "num_problems"} and result["num_problems"] == 2
    else:  # the final evaluation: SFT vs RL at two difficulties, printed and saved
        assert "Before/after RL (grpo)" in capsys.readouterr().out
        with open(tmp_path / "eval.json") as f:
            saved = json.load(f)
        assert set(saved["compare"]) == {"train difficulty", "harder"}
        assert set(saved["compare"]["harder"]) == {"SFT", "RL"} and "pass@2" in saved["table"]
        # rl.py samples pass@n at the training difficulty only (rl.compare.harder_samples).
        assert "pass@2" in saved["compare"]["train difficulty"]["RL"]
        assert set(saved["compare"]["harder"]["RL"]) == {"greedy"}
        assert result["accuracy"] == saved["accuracy"] and saved["num_problems"] == 2


def test_dpo_on_its_own_samples_through_the_loop(policy_dir, tmp_path, monkeypatch):
    # Half the responses "verify", so most prompts have a correct and a wrong response.
    monkeypatch.setattr(R, "verify_response", lambda problem, text: float(len(text) % 2 == 0))
    config = policy_config(
        "dpo",
        policy_dir,
        **{"rl.max_new_tokens": 3, "rl.group_size": 4, "num_steps": 2, "checkpoint_every": 2},
    )
    run(config, str(tmp_path))
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # The policy starts as the reference: every margin is 0, the loss log 2.
    assert records[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert records[0]["rollout/train_rows"] >= 8


# ---------------------------------------------------------------------- losses on their own


@pytest.fixture(scope="module")
def tiny_model():
    from model.config import get_preset
    from model.transformer import Transformer, init_params

    cfg = get_preset("tiny")
    return Transformer(cfg), init_params(cfg, jax.random.PRNGKey(0))


def pair_batch(b=2, length=6):
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 100, (b, 2, length)).astype(np.int32)
    mask = np.zeros((b, 2, length), np.float32)
    mask[..., 2:5] = 1.0  # three response targets per row
    return {
        "inputs": inputs,
        "targets": np.concatenate([inputs[..., 1:], np.zeros((b, 2, 1), np.int32)], axis=-1),
        "segment_ids": np.ones((b, 2, length), np.int32),
        "response_mask": mask,
        "ref_logp": np.zeros((b, 2), np.float32),
    }


def response_logprobs(model, params, batch):
    from rl.ppo_losses import token_logprobs

    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if k != "ref_logp"}
    logits = model.apply({"params": params}, flat["inputs"], None, flat["segment_ids"])
    logp = np.asarray(token_logprobs(logits, flat["targets"]))
    return logp, flat["response_mask"]


def test_expert_iteration_loss_is_the_response_cross_entropy(tiny_model):
    from train.objectives import get_objective

    model, params = tiny_model
    pairs = pair_batch()
    batch = {k: v[:, 0] for k, v in pairs.items() if k != "ref_logp"}  # plain [b, L] rows
    loss, metrics = get_objective("expert_iteration").make_loss(None, model)(params, batch, None)
    logp, mask = response_logprobs(model, params, batch)
    np.testing.assert_allclose(loss, -(logp * mask).sum() / mask.sum(), rtol=1e-5)
    assert metrics["response_tokens"] == 6


def test_orpo_loss_uses_mean_logprobs_of_chosen_and_rejected(tiny_model):
    import ml_collections

    from train.objectives import get_objective

    model, params = tiny_model
    config = ml_collections.ConfigDict({"rl": {"orpo_lambda": 0.5}})
    loss, metrics = get_objective("orpo").make_loss(config, model)(params, pair_batch(), None)
    logp, mask = response_logprobs(model, params, pair_batch())
    mean_Bx2 = ((logp * mask).sum(-1) / mask.sum(-1)).reshape(2, 2)
    np.testing.assert_allclose(metrics["nll"], -mean_Bx2[:, 0].mean(), rtol=1e-5)
    odds = mean_Bx2 - np.log1p(-np.exp(mean_Bx2))
    or_loss = np.mean(np.log1p(np.exp(-(odds[:, 0] - odds[:, 1]))))
    np.testing.assert_allclose(loss, metrics["nll"] + 0.5 * or_loss, rtol=1e-4)


@pytest.mark.parametrize("critic", ["shared", "detached"])
def test_detached_critic_trains_only_the_value_head(critic):
    from model.config import get_preset
    from model.transformer import Transformer, init_params
    from train.objectives import get_objective

    cfg = get_preset("tiny")
    model = Transformer(cfg, heads=("value",))
    params = init_params(cfg, jax.random.PRNGKey(0), heads=("value",))
    # A nonzero head, whatever its init: the trunk's value gradient flows through its kernel.
    kernel = params["value_head"]["kernel"]
    params["value_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
    config = rl_configs.get_config("tiny,algo=ppo")
    config.rl.critic, config.rl.entropy_coef, config.rl.value_clip_eps = critic, 0.0, 1e3
    rows = {k: v[:, 0] for k, v in pair_batch().items() if k != "ref_logp"}
    zeros = np.zeros_like(rows["response_mask"])
    batch = {
        **rows,
        "old_logprobs": zeros,
        "ref_logprobs": zeros,
        "advantages": zeros,  # no policy gradient: the loss is the value loss alone
        "old_values": zeros,
        "returns": rows["response_mask"],
        "kl_coef": np.zeros(2, np.float32),
    }
    loss_fn = get_objective("ppo").make_loss(config, model)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, None)
    trunk_norm = float(optax_norm({k: v for k, v in grads.items() if k != "value_head"}))
    assert float(optax_norm(grads["value_head"])) > 0 and metrics["value_loss"] > 0
    assert (trunk_norm == 0.0) == (critic == "detached")


def optax_norm(tree):
    import optax

    return optax.tree.norm(tree)
