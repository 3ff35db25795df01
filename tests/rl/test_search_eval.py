"""rl.search_eval: problem choice, the table and plot, and one tiny end-to-end run of the CLI."""

import functools
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data.builder import canonical_prompt
from data.format import encode_dialogue, problem_to_dialogue
from data.tasks import get_task
from data.tokenizer import Tokenizer
from rl import rerank, search_eval
from rl.reward_model import step_end_positions
from rl.search_beam import SearchTokens
from tests.conftest import run_cli
from train.checkpoint import load_params

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_n_values_double_up_to_max_n():
    assert search_eval.n_values(64) == [1, 2, 4, 8, 16, 32, 64]
    assert search_eval.n_values(6) == [1, 2, 4, 6]
    assert search_eval.n_values(1) == [1]
    with pytest.raises(ValueError, match="max_n"):
        search_eval.n_values(0)


def test_knobs_parse_or_explain():
    assert search_eval.parse_knobs('{"addition": {"digits": 5}}') == {"addition": {"digits": 5}}
    assert search_eval.parse_knobs("") == {}
    with pytest.raises(ValueError, match="not valid JSON"):
        search_eval.parse_knobs("{digits: 5}")
    with pytest.raises(ValueError, match="knob dicts"):
        search_eval.parse_knobs('{"addition": 5}')


def test_fresh_problems_follow_the_knobs_and_skip_seen_prompts():
    knobs = {"addition": {"digits": 5}}
    first = search_eval.fresh_problems([], knobs, 6, 0, "test", seen=set())
    assert len(first) == 6 and {p.task for p in first} == {"addition"}
    assert all(len(p.answer) >= 5 for p in first)
    seen = {canonical_prompt(p.prompt) for p in first[:3]}
    again = search_eval.fresh_problems(["addition"], knobs, 6, 0, "test", seen=seen)
    assert not seen & {canonical_prompt(p.prompt) for p in again}
    with pytest.raises(ValueError, match="not in --tasks"):
        search_eval.fresh_problems(["sorting"], knobs, 2, 0, "test", seen=set())


def _result():
    curve = {"n": [1, 2, 4], "mean": [0.4, 0.5, 0.6], "std": [0.1, 0.05, 0.0]}
    return {
        "num_problems": 4,
        "pass@1": 0.4,
        "mean_sample_tokens": 12.0,
        "methods": {"majority_vote": curve, rerank.ORACLE: {**curve, "std": [0, 0, 0]}},
        "beam_search": [
            {
                "beam_width": 2,
                "num_candidates": 2,
                "accuracy": 0.5,
                "finished": 1.0,
                "tokens_per_problem": 36.0,
                "equivalent_n": 3.0,
            }
        ],
    }


def test_table_and_files(tmp_path):
    table = search_eval.format_table(_result())
    assert "majority_vote" in table and "N=4" in table and "W=2" in table
    json_path, png_path = search_eval.write(_result(), str(tmp_path / "out"))
    assert json.load(open(json_path)) == _result()
    assert open(png_path, "rb").read(8) == PNG_SIGNATURE


def _reward_workdir(sft_workdir: str, workdir: str, kind: str, seed: int) -> str:
    """A reward-model workdir: the SFT run's params plus a random reward head, as kind."""
    os.makedirs(workdir)
    with open(os.path.join(sft_workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({**config, "objective": kind}, f)
    shutil.copy(os.path.join(sft_workdir, "tokenizer.model"), workdir)
    params, _ = load_params(sft_workdir)
    d_model = params["embed"]["embedding"].shape[1]
    kernel = jax.random.normal(jax.random.PRNGKey(seed), (d_model, 1))
    params = {**params, "reward_head": {"kernel": kernel, "bias": np.zeros((1,), np.float32)}}
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager(path, item_names=("params",), options=options) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    return workdir


def test_search_tokens_end_steps_where_the_prm_scores_them(tiny_run):
    tokenizer = Tokenizer.load(os.path.join(tiny_run, "tokenizer.model"))
    ids = SearchTokens.from_tokenizer(tokenizer)
    problem = get_task("multiplication").generate(np.random.default_rng(0))
    encoded = encode_dialogue(problem_to_dialogue(problem), tokenizer)
    tokens = [int(t) for t in encoded.tokens]
    ends = [
        i
        for i, t in enumerate(tokens)
        if t == ids.newline and ids.in_thoughts_after(False, tokens[: i + 1])
    ]
    assert len(ends) == len(problem.steps) >= 2
    np.testing.assert_array_equal(ends, np.flatnonzero(encoded.step_end))
    np.testing.assert_array_equal(ends, step_end_positions(tokens, tokenizer))


def test_cli_end_to_end_on_a_tiny_run(tiny_run, tmp_path):
    orm = _reward_workdir(tiny_run, str(tmp_path / "orm"), "orm", seed=1)
    prm = _reward_workdir(tiny_run, str(tmp_path / "prm"), "prm", seed=2)
    out = str(tmp_path / "out")
    proc = run_cli(
        "rl.search_eval",
        f"--policy={tiny_run}",
        f"--orm={orm}",
        f"--prm={prm}",
        "--num_problems=4",
        "--max_n=4",
        "--num_draws=4",
        "--beam_widths=2",
        "--beam_candidates=2",
        "--beam_step_tokens=8",
        f"--out={out}",
    )
    result = json.load(open(os.path.join(out, search_eval.RESULT_FILE)))
    assert result["num_problems"] == 4 and result["pool_size"] == 4
    assert set(result["methods"]) == set(rerank.METHODS) | {rerank.ORACLE}
    for curve in result["methods"].values():
        assert curve["n"] == [1, 2, 4]
        assert all(0.0 <= m <= 1.0 for m in curve["mean"])
    oracle = result["methods"][rerank.ORACLE]["mean"]
    assert oracle[0] == pytest.approx(result["pass@1"]) and oracle == sorted(oracle)
    (beam,) = result["beam_search"]
    assert beam["beam_width"] == 2 and beam["tokens_per_problem"] > 0
    assert beam["equivalent_n"] == pytest.approx(
        beam["tokens_per_problem"] / result["mean_sample_tokens"]
    )
    assert result["config"]["policy"] == tiny_run
    with open(os.path.join(out, search_eval.PLOT_FILE), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert "majority_vote" in proc.stdout and "beam W=2" in proc.stdout


def test_problems_come_from_the_reward_models_data_and_never_from_policy_training(
    tiny_run, tmp_path
):
    from train.workdir import read_config

    config = read_config(tiny_run)
    load = functools.partial(
        search_eval.load_problems, tiny_run, config, tasks=[], knobs={}, seed=0
    )
    # The policy's own train split: every prompt was trained on, so none is held out.
    assert load(split="train", num=8) == []
    test = load(split="test", num=3)
    assert len(test) == 3 and len({p.task for p in test}) > 1  # the tiny mix

    other = str(tmp_path / "letters")
    os.makedirs(other)
    shutil.copy(os.path.join(tiny_run, "tokenizer.model"), other)  # as init_from copies it
    letters = ml_collections.ConfigDict(config.to_dict())
    letters.data.tasks = {"letter_count": {"weight": 1.0, "knobs": {"length": [3, 5]}}}
    chosen = load(split="test", num=3, data_from=(other, letters))
    assert len(chosen) == 3 and {p.task for p in chosen} == {"letter_count"}
    assert all(3 <= len(p.meta["word"]) <= 5 for p in chosen)
