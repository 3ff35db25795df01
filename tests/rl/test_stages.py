"""The RL job's prerequisite runs: paths next to the workdir, built when missing, else reused."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rl import stages
from tests.train.test_workdir import BUCKET, bucket  # noqa: F401 (the fake gs:// bucket)
from train import checkpoint
from train.configs import rl as rl_configs
from train.step import TrainState


def finished_run(workdir: str, num_steps: int = 1) -> str:
    """A workdir that looks finished: config.json, eval.json and its last checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"num_steps": num_steps}, f)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump({"step": num_steps}, f)
    state = TrainState(np.int32(0), {"w": np.zeros(2)}, {}, jax.random.PRNGKey(0))
    with checkpoint.make_manager(workdir, keep=1, async_save=False) as manager:
        checkpoint.save(manager, num_steps, state, ocp.args.JsonSave({}))
    return workdir


@pytest.fixture
def runs(monkeypatch):
    """Stage runs, recorded instead of trained: (objective, init_from, workdir)."""
    calls = []
    import train.loop

    monkeypatch.setattr(
        train.loop,
        "run",
        lambda config, workdir: calls.append((config.objective, config.init_from, workdir)),
    )
    return calls


def test_resolve_puts_stages_next_to_the_workdir(tmp_path):
    workdir = str(tmp_path / "runs" / "rl")
    assert stages.resolve("{workdir}/../sft", workdir) == str(tmp_path / "runs" / "sft")
    assert stages.resolve("/abs/sft", workdir) == "/abs/sft"
    assert stages.resolve("", workdir) == ""


def test_resolve_keeps_a_bucket_uri_whole():
    workdir = "gs://bucket/runs/rl"
    assert stages.resolve("{workdir}/../sft", workdir) == "gs://bucket/runs/sft"
    assert stages.resolve("{workdir}/./prm/", workdir) == "gs://bucket/runs/rl/prm"
    assert stages.resolve("gs://other/a//b/../c", workdir) == "gs://other/a/c"
    assert stages.resolve("{workdir}/../../..", workdir) == "gs://bucket"  # not above it
    assert stages.resolve("{workdir}/../sft", "runs/rl") == os.path.abspath("runs/sft")


def test_stages_in_a_bucket_are_found_through_epath(bucket, runs, capsys):  # noqa: F811
    config = rl_configs.get_config("tiny")
    stages.ensure_stages(config, f"{BUCKET}/runs/rl")
    assert runs == [("sft", "", f"{BUCKET}/runs/sft_tiny")]
    assert "not finished: training it first" in capsys.readouterr().out

    (bucket / "hf").mkdir()
    (bucket / "hf" / "config.json").write_text("{}")
    (bucket / "hf" / "model.safetensors").write_bytes(b"")
    config.init_from = f"{BUCKET}/hf"
    stages.ensure_stages(config, f"{BUCKET}/runs/rl")
    assert len(runs) == 1  # a Hugging Face directory is used as it is, never trained
    assert not stages.is_finished(f"{BUCKET}/hf")


def test_missing_sft_and_prm_are_built_in_order(tmp_path, runs, capsys):
    config = rl_configs.get_config("tiny,reward=outcome_prm")
    workdir = str(tmp_path / "rl")
    stages.ensure_stages(config, workdir)
    sft, prm = str(tmp_path / "sft_tiny"), str(tmp_path / "prm_letter_count")
    assert config.init_from == sft and config.rl.prm.workdir == prm
    assert runs == [("sft", "", sft), ("prm", sft, prm)]
    out = capsys.readouterr().out
    assert "not finished: training it first with --config=sft.py:tiny" in out
    assert "--config=rm.py:kind=prm,tiny" in out


def test_finished_stages_are_reused_and_unfinished_ones_resumed(tmp_path, runs, capsys):
    finished_run(str(tmp_path / "sft_tiny"))
    config = rl_configs.get_config("tiny")
    stages.ensure_stages(config, str(tmp_path / "rl"))
    assert runs == []  # no PRM without the dense reward
    assert "Reusing the finished SFT run" in capsys.readouterr().out

    unfinished = finished_run(str(tmp_path / "sft_long"), num_steps=1)
    with open(os.path.join(unfinished, "config.json"), "w") as f:
        json.dump({"num_steps": 5}, f)  # its checkpoint is at step 1 of 5
    config.init_from = unfinished
    stages.ensure_stages(config, str(tmp_path / "rl"))
    assert runs == [("sft", "", unfinished)]
    assert "resuming the unfinished run" in capsys.readouterr().out


def test_configs_without_rl_are_left_alone(tmp_path, runs):
    from train.configs import sft

    config = sft.get_config("tiny")
    config.init_from = "{workdir}/../x"
    stages.ensure_stages(config, str(tmp_path))
    assert config.init_from == "{workdir}/../x" and runs == []
