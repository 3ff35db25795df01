"""Starting from an older checkpoint: kept steps, `init_from_step`, and who reads it.

The reward-model experiment samples an under-trained SFT checkpoint (train/configs/rm.py), so
SFT keeps that step (`keep_steps`) beyond its last two, and the reward models, their data and
rl.search_eval all read the same one.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from rl import rm_data, search_eval
from rl.rollout import reference_of
from tests.conftest import tiny_config
from tests.train.test_checkpoint_reshard import random_like, state_on
from train import checkpoint, init_from
from train.configs import rm as rm_config

STEPS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir that saved steps 1-4 (each its own random state), keeping the last and 2:
    (path, {step: saved state})."""
    abstract, shardings = state_on((8, 1, 1), "dp")
    path = tmp_path_factory.mktemp("keep") / "run"
    manager = checkpoint.make_manager(str(path), keep=1, keep_steps=(2,), async_save=False)
    saved = {}
    for step in STEPS:
        saved[step] = random_like(abstract, seed=step)
        state = jax.device_put(saved[step], shardings)
        checkpoint.save(manager, step, state, ocp.args.JsonSave({"position": step}))
    manager.close()
    return path, saved


def test_kept_steps_survive_beyond_the_last_n(run_dir):
    path, saved = run_dir
    with ocp.CheckpointManager(checkpoint.checkpoint_dir(path)) as manager:
        assert sorted(manager.all_steps()) == [2, 4]
    params, step = checkpoint.load_params(path, step=2)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[2].params)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 3 \(has \[2, 4\]\)"):
        checkpoint.load_params(path, step=3)


def test_init_from_step_picks_the_trunk_of_that_checkpoint(run_dir):
    path, saved = run_dir
    like, _ = state_on((8, 1, 1), "dp")
    newest = init_from.find_source(str(path))
    older = init_from.find_source(str(path), 2)
    assert (newest.step, older.step) == (None, 2)
    for source, step in ((newest, 4), (older, 2)):
        trunk = init_from.load_params(source, None, like.params)
        expected = {k: v for k, v in saved[step].params.items() if k in trunk}
        assert set(trunk) == set(expected) == set(like.params)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(trunk), expected)
    with pytest.raises(FileNotFoundError, match="no checkpoint 3"):
        init_from.load_params(init_from.find_source(str(path), 3), None, like.params)
    with pytest.raises(ValueError, match="init_from_step must be >= 0"):
        init_from.find_source(str(path), -1)


def test_init_from_step_needs_a_workdir(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert init_from.find_source(str(hf)).kind == "hf"
    with pytest.raises(ValueError, match="needs a train.main workdir"):
        init_from.find_source(str(hf), 700)


def write_config(workdir: epath.Path, **fields) -> str:
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(fields))
    return str(workdir)


def test_search_eval_samples_the_checkpoint_the_reward_models_learned_from(tmp_path):
    policy = str(tmp_path / "sft")
    prm = write_config(tmp_path / "prm", init_from=policy, init_from_step=700)
    newest = write_config(tmp_path / "orm", init_from=policy, init_from_step=0)
    before = write_config(tmp_path / "old", init_from=policy)  # written before the field
    other = write_config(tmp_path / "other", init_from=str(tmp_path / "x"), init_from_step=5)

    # rm.py's way: start from the newest checkpoint, sample an older one.
    orm = write_config(tmp_path / "orm2", init_from=policy, rm_data={"policy_step": 600})

    assert search_eval.default_policy_step(policy, [prm, newest]) == 700
    assert search_eval.default_policy_step(policy + "/", [None, prm]) == 700
    assert search_eval.default_policy_step(policy, [None, orm]) == 600
    assert search_eval.default_policy_step(policy, [newest, before, other, None]) is None


def test_reward_data_samples_rm_data_policy_step_else_init_from_step():
    config = rm_config.get_config("kind=prm,task=letter_count")  # RL's PRM: the final policy
    assert (config.init_from_step, config.rm_data.policy_step) == (0, 0)
    assert rm_data.sampling_step(config) is None  # the newest
    config.init_from_step = 700
    assert rm_data.sampling_step(config) == 700
    config.rm_data.policy_step = 600
    assert rm_data.sampling_step(config) == 600
    spec = rm_data.rm_spec(config, "unused")
    assert spec["policy_step"] == 600 and "policy_step" not in spec["rm_data"]


def test_the_kl_reference_is_the_checkpoint_the_policy_started_from():
    config = tiny_config()
    config.init_from, config.init_from_step = "workdirs/sft", 700
    config.rl = {"ref_from": ""}
    assert reference_of(config) == ("workdirs/sft", 700)
    config.rl.ref_from = "workdirs/other"
    assert reference_of(config) == ("workdirs/other", 0)
