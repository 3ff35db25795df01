"""ORM and PRM objectives: the losses by hand, AUC by hand, and both on the shared loop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from model import config as model_config
from model import transformer
from rl import reward_model, rm_data
from tests.conftest import build_once, loop_on_one_device
from train import evaluate
from train.configs import rl as rl_configs
from train.configs import rm
from train.configs import sft as sft_configs
from train.metrics import read_metrics
from train.objectives import get_objective

# ---------------------------------------------------------------------------- losses


def random_reward_model(surprise_window: int = 0):
    """(config, model, random params) of a tiny decoder with a reward head."""
    cfg = dataclasses.replace(
        model_config.get_preset("tiny"), reward_surprise_window=surprise_window
    )
    model = transformer.Transformer(cfg, heads=("reward",))
    shapes = jax.eval_shape(
        lambda key: transformer.init_params(cfg, key, heads=("reward",)), jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), shapes)
    return cfg, model, params


@pytest.fixture(scope="module")
def model_and_params():
    return random_reward_model()


def toy_batch() -> dict:
    """Two rows: one packed with two segments, one padded; targets on a few tokens."""
    rng = np.random.default_rng(1)
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 10 + [0] * 2], np.int32)
    positions = np.array([[*range(5), *range(4), 0, 0, 0], [*range(10), 0, 0]], np.int32)
    zeros = np.zeros((2, 12), np.float32)
    batch = {
        "inputs": rng.integers(0, 128, (2, 12)).astype(np.int32),
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": zeros.copy(),  # response tokens, set below
        "orm_mask": zeros.copy(),
        "orm_target": zeros.copy(),
        "step_end_mask": zeros.copy(),
        "step_target": zeros.copy(),
    }
    # Each segment's response; in two of them (these inputs, the random model below) a prompt
    # token is more surprising than any response token, so reading the prompt shows.
    for row, start, end in ((0, 3, 5), (0, 8, 9), (1, 7, 10)):
        batch["loss_mask"][row, start:end] = 1.0
    for row, col, label in ((0, 4, 1.0), (0, 8, 0.0), (1, 9, 1.0)):  # each segment's last token
        batch["orm_mask"][row, col], batch["orm_target"][row, col] = 1.0, label
    for row, col, label in ((0, 1, 1.0), (0, 3, 0.0), (0, 6, 0.25), (1, 2, 0.75), (1, 7, 1.0)):
        batch["step_end_mask"][row, col], batch["step_target"][row, col] = 1.0, label
    return batch


def bce(logits, targets) -> np.ndarray:
    """Cross-entropy of sigmoid(logits) against (soft) targets, in float64."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    return -(targets * np.log(p) + (1.0 - targets) * np.log(1.0 - p))


@pytest.mark.parametrize(
    "kind, target, mask",
    [("orm", "orm_target", "orm_mask"), ("prm", "step_target", "step_end_mask")],
)
@pytest.mark.parametrize("negative_weight", [1.0, 5.0])
@pytest.mark.parametrize("surprise_window", [0, 12])
def test_loss_is_bce_at_the_marked_tokens(kind, target, mask, negative_weight, surprise_window):
    """For a linear head and one that reads the surprise of the response tokens only."""
    cfg, model, params = random_reward_model(surprise_window)
    batch = toy_batch()
    config = rm.get_config(f"kind={kind}")
    config.loss.negative_weight = negative_weight
    loss_fn = get_objective(kind).make_loss(config, model)
    loss, metrics = loss_fn(params, batch, jax.random.PRNGKey(0))
    # Reference logits through the scoring API (positions derived from the segments).
    logits = np.asarray(
        reward_model.reward_logits(
            params, cfg, batch["inputs"], batch["segment_ids"], batch["loss_mask"]
        )
    )
    if surprise_window:  # the prompt's surprise would change the logits: the mask matters
        every_token = reward_model.reward_logits(
            params, cfg, batch["inputs"], batch["segment_ids"], np.ones((2, 12), np.float32)
        )
        assert not np.allclose(logits[batch[mask] > 0], np.asarray(every_token)[batch[mask] > 0])
    marked = batch[mask] > 0
    targets = batch[target][marked]
    assert 0 < targets.mean() < 1, "the toy batch needs right and wrong labels"
    per_label = bce(logits[marked], targets)
    weights = targets + (1.0 - targets) * negative_weight  # a wrong label weighs more
    np.testing.assert_allclose(
        float(loss), np.sum(weights * per_label) / np.sum(weights), rtol=1e-5
    )
    np.testing.assert_allclose(float(metrics["bce"]), per_label.mean(), rtol=1e-5)
    right = (logits[marked] > 0) == (batch[target][marked] >= 0.5)
    np.testing.assert_allclose(float(metrics["accuracy"]), right.mean(), rtol=1e-6)
    assert float(metrics["labelled"]) == marked.sum()
    assert get_objective(kind).heads == ("reward",) and get_objective(kind).batches == "rm"


@pytest.mark.parametrize("weight", [0.0, -1.0, "10"])
def test_a_bad_negative_weight_is_refused_by_name(model_and_params, weight):
    _, model, _ = model_and_params
    config = rm.get_config("kind=prm")
    with config.ignore_type():
        config.loss.negative_weight = weight
    with pytest.raises(ValueError, match="loss.negative_weight must be a number > 0"):
        get_objective("prm").make_loss(config, model)


# ---------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    "scores, labels, auc",
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # one discordant pair of four
        ([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1], 0.75),  # two ties count half each
        ([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0], 0.5),
        ([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 1.0),
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),
        ([0.2, 0.7, 0.7, 0.1, 0.7], [0, 1, 0, 0, 1], 5.0 / 6.0),  # 4 wins, 2 ties of 6 pairs
        ([0.1, 0.9], [1, 1], None),  # one class only
    ],
)
def test_roc_auc_by_hand(scores, labels, auc):
    got = evaluate.roc_auc(scores, labels)
    if auc is None:
        assert got is None
    else:
        assert got == pytest.approx(auc)


def test_roc_auc_equals_pair_counting():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(40), 1)  # many ties
    labels = rng.random(40) < 0.4
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(scores[labels], scores[~labels])
    ]
    assert evaluate.roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    np.testing.assert_array_equal(evaluate.average_ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])


@pytest.mark.parametrize(
    "probs, labels, mask, hit",
    [
        ([0.9, 0.2, 0.1], [1, 0, 1], [1, 1, 0], True),
        ([0.4, 0.2, 0.1], [1, 0, 1], [1, 1, 0], False),  # flags step 0 first
        ([0.9, 0.8, 0.1], [1, 0, 1], [1, 1, 0], False),  # misses step 1
        ([0.9, 0.8, 0.9], [1, 0, 1], [1, 1, 0], False),  # flags nothing
        ([0.9, 0.1], [1, 1], [1, 1], None),  # no wrong step
        ([0.9, 0.1], [1, 0], [1, 0], None),  # the wrong label is masked out
    ],
)
def test_first_error_hit(probs, labels, mask, hit):
    assert evaluate.first_error_hit(np.array(probs), labels, mask) == hit


def test_reward_metrics_on_hand_made_rows():
    def row(final, orm, steps, labels, mask):
        return {"final": final, "orm_label": orm, "steps": np.array(steps),
                "step_labels": np.array(labels), "step_mask": np.array(mask)}  # fmt: skip

    rows = [
        row(0.9, 1.0, [0.8, 0.9], [1, 1], [1, 1]),
        row(0.3, 0.0, [0.7, 0.2, 0.6], [1, 0, 1], [1, 1, 0]),  # first error found
        row(0.6, 0.0, [0.3, 0.9], [1, 0], [1, 1]),  # first error missed
    ]
    result = evaluate.reward_metrics(rows)
    assert result["orm_auc"] == 1.0 and result["orm_accuracy"] == pytest.approx(2 / 3)
    # Labelled steps: probs .8 .9 .7 .2 .3 .9 with labels 1 1 1 0 1 0.
    assert result["prm_auc"] == pytest.approx(evaluate.roc_auc([.8, .9, .7, .2, .3, .9],
                                                                [1, 1, 1, 0, 1, 0]))  # fmt: skip
    assert result["prm_accuracy"] == pytest.approx(4 / 6)
    assert result["first_error_accuracy"] == 0.5 and result["num_wrong_traces"] == 2
    assert result["num_steps"] == 6 and result["num_records"] == 3


# ---------------------------------------------------------------------------- config, loop


def test_config_variants():
    assert rm.get_config("kind=prm").objective == "prm"
    assert rm.get_config().init_from == "workdirs/sft"
    with pytest.raises(ValueError, match="kind"):
        rm.get_config("kind=dpo")
    # The search experiment's task by default; RL's task and difficulty for its dense reward.
    assert list(rm.get_config().data.tasks) == ["multiplication"]
    letters = rm.get_config("kind=prm,task=letter_count")
    assert dict(letters.data.tasks["letter_count"].knobs) == rl_configs.KNOBS
    assert rl_configs.get_config().rl.prm.stage == "rm.py:kind=prm,task=letter_count"
    # The search experiment samples the SFT run's kept under-trained checkpoint and trains
    # a surprise-reading head alone; RL's PRM samples the final policy with a linear head.
    for kind in ("orm", "prm"):
        search = rm.get_config(f"kind={kind}")
        assert search.rm_data.policy_step == sft_configs.RM_POLICY_STEP
        assert sft_configs.RM_POLICY_STEP in sft_configs.get_config().keep_steps
        # The PRM's window holds a step; the ORM's, read once at the end, the whole record.
        window = {"orm": search.data.seq_len, "prm": 32}[kind]
        assert search.model.reward_surprise_window == window
        assert search.optimizer.freeze == rm.HEAD_ONLY and search.init_from_step == 0
        assert search.num_steps == {"orm": 240, "prm": 480}[kind]
    assert letters.rm_data.policy_step == 0 and letters.model.reward_surprise_window == 0
    assert letters.optimizer.freeze == "" and letters.optimizer.lr == 1e-3
    with pytest.raises(ValueError, match="task must be one of"):
        rm.get_config("task=sorting")
    with pytest.raises(FileNotFoundError, match="init_from"):
        rm_data.policy_dir(rm.get_config("tiny"))


@pytest.fixture(scope="module")
def rm_runs(tiny_run, tmp_path_factory):
    """Two steps each of rm.py:tiny kind=orm and kind=prm from the tiny SFT run (in-process),
    once per test run (tests/conftest.py:build_once)."""
    from train.loop import run

    def build(folder):  # on one device: ORM and PRM on meshes are test_mesh_equivalence's
        workdirs = {}
        for kind in ("orm", "prm"):
            config = rm.get_config(f"kind={kind},tiny")
            config.init_from = tiny_run
            workdirs[kind] = str(folder / kind)
            if kind == "orm":
                run(config, workdirs[kind])
                continue
            # Same data config, policy and rm_data: the PRM finds the ORM's data, samples nothing.
            shutil.copytree(
                os.path.join(workdirs["orm"], "data"), os.path.join(workdirs[kind], "data")
            )
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(rm_data, "generate_splits", lambda *args: pytest.fail("not cached"))
                run(config, workdirs[kind])
        return workdirs

    with loop_on_one_device():
        return build_once(tmp_path_factory, "rm_runs", build)


@pytest.mark.parametrize("kind", ["orm", "prm"])
def test_reward_model_trains_on_the_shared_loop(rm_runs, tiny_run, kind):
    workdir = rm_runs[kind]
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["bce"]) and r["labelled"] > 0 for r in records)
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert result["step"] == 2 and result["kind"] == kind
    # The tiny data has corrupted and clean traces, so both classes exist everywhere.
    for key in ("orm_auc", "prm_auc", "first_error_accuracy", "orm_accuracy", "prm_accuracy"):
        assert 0.0 <= result[key] <= 1.0, key
    assert set(result["per_source"]) == {"policy", "corrupted", "clean"}

    loaded = reward_model.load_reward_model(workdir)
    assert loaded.kind == kind
    (score,) = reward_model.score_texts(loaded, ["What is 4821 + 937?"], ["Answer: 5758"])
    # No thought step: the answer step, at the closing <|eot_id|>, is the only one judged.
    assert 0.0 < score.final < 1.0 and score.steps.tolist() == [score.final]
    with pytest.raises(ValueError, match="reward head"):
        reward_model.load_reward_model(tiny_run)
