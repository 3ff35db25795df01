"""Each reward on well-formed and broken responses; the weighted mix; the KL penalty."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np
import pytest

from data.format import problem_to_dialogue, render_assistant
from data.tasks import get_task
from rl import rewards as R

T = 8  # response width of the test batches


def problem(task="addition", seed=0, **knobs):
    return get_task(task).generate(np.random.default_rng(seed), split="test", **knobs)


def good_text(p) -> str:
    """The problem's own worked response: well-formed and correct."""
    return render_assistant(problem_to_dialogue(p).turns[-1])


def responses(problems, texts, lengths=None, finished=None) -> R.Responses:
    n = len(texts)
    lengths_R = np.asarray(lengths if lengths is not None else [T] * n, np.int32)
    finished_R = np.asarray(finished if finished is not None else [True] * n, bool)
    return R.Responses(
        problems=problems,
        texts=texts,
        tokens_RxT=np.ones((n, T), np.int32),
        lengths_R=lengths_R,
        finished_R=finished_R,
        inputs_RxL=np.ones((n, 3 + T), np.int32),
        prompt_lengths_R=np.full(n, 3, np.int32),
    )


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_outcome_reward_scores_correct_wrong_and_garbage():
    p = problem()
    good = good_text(p)
    wrong = good.replace(f"Answer: {p.answer}", f"Answer: {int(p.answer) + 1}")
    texts = [good, wrong, "", "<|thoughts|>\x00 Answer: ???", good[: len(good) // 2]]
    rs = responses([p] * len(texts), texts, lengths=[8, 5, 1, 3, 8])
    correct_R = np.asarray(
        [R.verify_response(q, t) for q, t in zip(rs.problems, texts, strict=True)]
    )
    np.testing.assert_array_equal(correct_R, [1.0, 0.0, 0.0, 0.0, 0.0])
    rewards_RxT = R.outcome_reward(rs, correct_R)
    assert rewards_RxT[0, 7] == 1.0 and rewards_RxT.sum() == 1.0  # on the last token only


def test_outcome_of_a_code_task_runs_the_sandbox():
    p = problem("program_write", seed=3)
    good = good_text(p)
    assert R.verify_response(p, good) == 1.0
    head, fence, code = good.rpartition("```python")
    broken = head + fence + code.replace("return", "retrun")  # the code block, not the thoughts
    assert fence and R.verify_response(p, broken) == 0.0


def test_verifier_errors_score_zero(monkeypatch):
    def boom(problem, text):
        raise RuntimeError("verifier bug")

    monkeypatch.setattr(R, "verify", boom)
    assert R.verify_response(problem(), "Answer: 1") == 0.0


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t, 1.0),
        (lambda t: t + "\nAnswer: 7", 0.0),  # two answer lines
        (lambda t: t.replace("<|end_thinking_block|>", ""), 0.0),  # unclosed block
        (lambda t: t.split("<|end_thinking_block|>\n")[1], 0.0),  # no thinking block
        (lambda t: t.replace("<|summary|>", ""), 0.0),  # block without summary
        (lambda t: t.rsplit("Answer:", 1)[0], 0.0),  # no answer line
        (lambda t: "<|eot_id|>" + t, 0.0),
    ],
)
def test_format_score(mutate, expected):
    assert R.format_score(mutate(good_text(problem("letter_count")))) == expected


def test_format_reward_sits_on_the_last_token():
    p = problem()
    rs = responses([p, p], [good_text(p), "no format"], lengths=[4, 6])
    rewards_RxT = R.format_reward(rs, np.zeros(2))
    np.testing.assert_array_equal(rewards_RxT.sum(axis=1), [1.0, 0.0])
    assert rewards_RxT[0, 3] == 1.0


def test_length_reward_is_free_then_linear_and_minus_one_when_cut_off():
    p = problem()
    rs = responses([p] * 4, ["a"] * 4, lengths=[2, 4, 6, 8], finished=[True, True, True, False])
    rewards_RxT = R.make_length_reward(free_tokens=4)(rs, np.zeros(4))
    np.testing.assert_allclose(rewards_RxT.sum(axis=1), [0.0, 0.0, -0.5, -1.0])


def test_prm_reward_is_the_mean_step_score_minus_baseline_on_step_ends():
    p = problem()
    rs = responses([p] * 3, ["a"] * 3, lengths=[8, 8, 5])
    steps = [
        (np.array([1, 4]), np.array([0.9, 0.3])),
        (np.array([], int), np.array([])),  # no thought steps: no reward
        (np.array([2, 6]), np.array([1.0, 0.0])),  # column 6 is past the response's end
    ]
    rewards_RxT = R.make_prm_reward(lambda r: steps, baseline=0.5)(rs, np.zeros(3))
    np.testing.assert_allclose(rewards_RxT[0, [1, 4]], [0.2, -0.1], atol=1e-6)
    np.testing.assert_allclose(rewards_RxT.sum(axis=1), [0.1, 0.0, 0.5], atol=1e-6)
    assert np.count_nonzero(rewards_RxT) == 3


def test_mix_weights_components_and_always_verifies(executor):
    p = problem()
    good = good_text(p)
    rs = responses([p, p], [good, "Answer: nope"], lengths=[3, 8])
    device = R.Component("steps", 2.0, lambda r, c: np.full((2, T), 0.25, np.float32), host=False)
    mix = R.RewardMix([R.Component("format", 0.5, R.format_reward), device])
    scored = mix(rs, executor)
    np.testing.assert_array_equal(scored.correct_R, [1.0, 0.0])
    np.testing.assert_allclose(scored.components["format"], [1.0, 0.0])
    np.testing.assert_allclose(scored.components["steps"], [2.0, 2.0])
    np.testing.assert_allclose(scored.rewards_RxT.sum(axis=1), [0.5 + 4.0, 4.0])


def test_make_reward_mix_from_config():
    config = ml_collections.ConfigDict(
        {"rewards": {"outcome": 1.0, "format": 0.0, "length": 0.1}, "length_free_tokens": 4}
    )
    mix = R.make_reward_mix(config, tokenizer=None)
    assert [(c.name, c.weight) for c in mix.components] == [("length", 0.1), ("outcome", 1.0)]
    config.rewards = {"outcome": 1.0, "typo": 1.0}
    with pytest.raises(ValueError, match="unknown rewards"):
        R.make_reward_mix(config, tokenizer=None)


def test_kl_penalty_masks_and_matches_the_estimator():
    logp = np.log(np.array([[0.5, 0.2, 0.9]], np.float32))
    ref = np.log(np.array([[0.25, 0.2, 0.1]], np.float32))
    mask = np.array([[1.0, 1.0, 0.0]])
    k1 = R.kl_penalty(logp, ref, mask, "k1")
    np.testing.assert_allclose(k1, [[np.log(2.0), 0.0, 0.0]], rtol=1e-6)
    k3 = R.kl_penalty(logp, ref, mask, "k3")
    np.testing.assert_allclose(k3[0, 0], 0.5 - 1 + np.log(2.0), rtol=1e-5)
    assert k3[0, 2] == 0.0
