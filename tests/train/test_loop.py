"""The one loop: end to end, a second objective, NaN stop, init_from, bad config keys."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import run_cli, tiny_config
from train import checkpoint, objectives
from train.loop import NonFiniteLossError, run
from train.metrics import read_metrics
from train.objectives.sft import cross_entropy, masked_mean

# The loop's runs here use one device; on meshes it is test_mesh_equivalence's subject.
pytestmark = pytest.mark.usefixtures("one_device_loop")


def test_tiny_run_writes_the_contract_files(tiny_run):
    for name in ("config.json", "metrics.jsonl", "tokenizer.model", "eval.json"):
        assert os.path.exists(os.path.join(tiny_run, name)), name
    assert glob.glob(os.path.join(tiny_run, "events.out.tfevents.*"))
    assert checkpoint.latest_step(tiny_run) == 6

    records = read_metrics(os.path.join(tiny_run, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
        for part in ("ce_headline", "ce_thoughts", "ce_summary", "ce_answer", "grad_norm", "lr"):
            assert part in r
    # Six steps of a tiny model at lr 3e-3 already cut the loss.
    assert records[-1]["loss"] < records[0]["loss"]

    with open(os.path.join(tiny_run, "eval.json")) as f:
        result = json.load(f)
    assert result["num_problems"] == 4 and result["step"] == 6
    assert set(result) >= {"accuracy", "well_formed", "mean_thought_tokens", "per_task"}
    with open(os.path.join(tiny_run, "config.json")) as f:
        config = json.load(f)
    assert config["objective"] == "sft" and config["model"]["d_model"] > 0


def test_evaluate_cli_rewrites_eval_json(tiny_run, tmp_path):
    workdir = shutil.copytree(tiny_run, tmp_path / "run")  # a copy: tiny_run is shared
    os.remove(workdir / "eval.json")
    proc = run_cli("train.evaluate", f"--workdir={workdir}")
    with open(workdir / "eval.json") as f:
        result = json.load(f)
    assert result["step"] == 6 and result["num_problems"] == 4
    assert "accuracy" in proc.stdout

    # A larger held-out split, written beside the run's eval.json, which stays as it was.
    run_cli(
        "train.evaluate",
        f"--workdir={workdir}",
        "--test_size=12",
        "--num_problems=0",
        "--out_name=eval_test12.json",
    )
    with open(workdir / "eval_test12.json") as f:
        assert json.load(f)["num_problems"] == 12
    with open(workdir / "eval.json") as f:
        assert json.load(f) == result


def test_sample_cli_prompts_file(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 482 * 37?\nWhat is 4821 + 937?\n")
    proc = run_cli(
        "rl.sample", f"--workdir={tiny_run}", f"--prompts_file={prompts}", "--max_new_tokens=8"
    )
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["prompt"] for line in lines] == ["What is 482 * 37?", "What is 4821 + 937?"]
    assert all(set(line) == {"prompt", "response", "answer"} for line in lines)


# A second objective through the same interface: cross-entropy on the answer tokens only,
# with a reward head on the model, to show the loop needs no change for a new objective.
@objectives.register("test_answer_only_ce", heads=("reward",))
def make_answer_ce(config, model):
    def loss_fn(params, batch, rng):
        out = model.apply(
            {"params": params},
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            method="forward",
        )
        ce_BxL, _ = cross_entropy(out.logits, batch["targets"])
        loss = masked_mean(ce_BxL, batch["answer_mask"])
        return loss, {"mean_reward_score": jnp.mean(out.scores["reward"])}

    return loss_fn


def test_second_objective_runs_on_the_same_loop(tmp_path):
    config = tiny_config(objective="test_answer_only_ce", num_steps=2, checkpoint_every=2)
    run(config, str(tmp_path))
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert "mean_reward_score" in records[0] and "ce_thoughts" not in records[0]
    params, _ = checkpoint.load_params(str(tmp_path))
    assert "reward_head" in params


@objectives.register("test_nan_from_batch_3")
def make_nan_loss(config, model):
    """The SFT loss, NaN from the third batch on (the test numbers its batches)."""
    sft_loss = objectives.get_objective("sft").make_loss(config, model)

    def loss_fn(params, batch, rng):
        loss, metrics = sft_loss(params, batch, rng)
        return jnp.where(jnp.max(batch["batch_index"]) >= 3, jnp.nan, loss), metrics

    return loss_fn


def test_nan_loss_stops_without_overwriting_checkpoints(tmp_path, monkeypatch):
    from train import batches

    original = batches.GrainProducer.next
    calls = {"n": 0}

    def numbered(self, state):
        batch = original(self, state)
        calls["n"] += 1
        return {**batch, "batch_index": np.full(batch["inputs"].shape, calls["n"], np.int32)}

    monkeypatch.setattr(batches.GrainProducer, "next", numbered)
    config = tiny_config(objective="test_nan_from_batch_3", num_steps=6, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        run(config, str(tmp_path))
    assert checkpoint.latest_step(str(tmp_path)) == 2
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert all(np.isfinite(r["loss"]) for r in records)


def test_init_from_copies_params_and_tokenizer(tiny_run, tmp_path):
    config = tiny_config(init_from=tiny_run, num_steps=1, checkpoint_every=1)
    config.optimizer.lr = 0.0
    config.objective = "test_answer_only_ce"  # adds a reward head the source lacks
    run(config, str(tmp_path))
    with (
        open(os.path.join(tiny_run, "tokenizer.model"), "rb") as a,
        open(tmp_path / "tokenizer.model", "rb") as b,
    ):
        assert a.read() == b.read()
    source, _ = checkpoint.load_params(tiny_run)
    loaded, _ = checkpoint.load_params(str(tmp_path))
    assert "reward_head" in loaded and "reward_head" not in source
    for a, b in zip(
        jax.tree.leaves(source),
        jax.tree.leaves({k: v for k, v in loaded.items() if k != "reward_head"}),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_an_older_step_with_a_surprise_reading_reward_head(tiny_run, tmp_path):
    config = tiny_config(init_from=tiny_run, init_from_step=3, num_steps=1, checkpoint_every=1)
    config.optimizer.lr = 0.0
    config.objective = "test_answer_only_ce"  # adds a reward head the source lacks
    config.model.reward_surprise_window = 8  # a head option a run may set on its source
    run(config, str(tmp_path))
    source, _ = checkpoint.load_params(tiny_run, step=3)
    newest, _ = checkpoint.load_params(tiny_run)
    loaded, _ = checkpoint.load_params(str(tmp_path))
    assert set(loaded["reward_head"]) == {"linear", "surprise_scale"}
    trunk = {k: v for k, v in loaded.items() if k != "reward_head"}
    jax.tree.map(np.testing.assert_array_equal, trunk, source)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, trunk, newest)))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"]["reward_surprise_window"] == 8


def test_keep_steps_outlive_the_last_checkpoints(tmp_path):
    config = tiny_config(num_steps=4, checkpoint_every=1, keep_checkpoints=1, keep_steps=(2,))
    run(config, str(tmp_path / "kept"))
    with ocp.CheckpointManager(checkpoint.checkpoint_dir(tmp_path / "kept")) as m:
        assert sorted(m.all_steps()) == [2, 4]
    config = tiny_config(num_steps=4, checkpoint_every=2, keep_steps=(3,))
    with pytest.raises(ValueError, match=r"keep_steps \[3\] are never saved"):
        run(config, str(tmp_path / "never"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.no_such_key=1", "no_such_key"),
        ("--config.num_steps=many", "num_steps"),
        ("--config.optimizer.lrr=0.1", "lrr"),
    ],
)
def test_bad_config_key_fails_before_any_work(tmp_path, override, message):
    workdir = tmp_path / "run"
    proc = run_cli(
        "train.main",
        "--config=sft.py:tiny",
        f"--workdir={workdir}",
        override,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not workdir.exists()


def test_init_from_hugging_face_directory(tiny_run, tmp_path):
    from model import hf
    from train.workdir import load_run

    source = load_run(tiny_run)
    hf_dir = tmp_path / "hf"
    hf.save_llama(source.model_cfg, source.params, str(hf_dir))
    source.tokenizer.save(str(hf_dir / "tokenizer.model"))

    config = tiny_config(init_from=str(hf_dir), num_steps=1, checkpoint_every=1)
    config.optimizer.lr = 0.0
    run(config, str(tmp_path / "run"))
    loaded, _ = checkpoint.load_params(str(tmp_path / "run"))
    for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
