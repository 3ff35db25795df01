"""Rerank tables from hand-made candidates with known scores: each method picks what it should."""

import dataclasses
import types

import numpy as np
import pytest

from data.format import parse_assistant
from data.tasks import get_task
from rl import rerank
from rl.generate import Generation
from rl.reward_model import ResponseScore


def _problem(seed):
    return get_task("addition").generate(np.random.default_rng(seed), digits=2)


PROBLEMS = [_problem(0), _problem(1)]
WRONG, OTHER = "-1", "-2"
# Per problem, per candidate: (answer, ORM probability, PRM step probabilities). The answer
# None writes no `Answer:` line; "T" stands for the true answer.
CANDIDATES = [
    [
        (WRONG, 0.9, [0.9, 0.9]),  # product .81, min .9
        ("T", 0.3, [0.95, 0.95, 0.95]),  # product .857, min .95
        (WRONG, 0.2, [0.99, 0.2]),  # product .198, min .2
        (OTHER, 0.1, [0.5]),
    ],
    [
        ("T", 0.4, [0.6, 0.99, 0.99, 0.99]),  # product .582, min .6
        (WRONG, 0.5, [0.7, 0.7]),  # product .49, min .7
        ("T", 0.45, [0.5]),
        (None, 0.6, []),  # unparseable, no steps: PRM score 0
    ],
]
EXPECTED_CHOICE = {
    "majority_vote": [0, 0],  # WRONG twice; T twice
    "orm_best_of_n": [0, 3],
    "prm_best_of_n_product": [1, 0],
    "prm_best_of_n_min": [1, 1],
    "orm_weighted_vote": [0, 0],  # WRONG 1.1 vs T 0.3; T 0.85 vs WRONG 0.5
    "prm_weighted_vote": [0, 0],  # WRONG 1.008 vs T 0.857; T 1.08 vs WRONG 0.49
}
EXPECTED_ACCURACY = {
    "majority_vote": 0.5,
    "orm_best_of_n": 0.0,
    "prm_best_of_n_product": 1.0,
    "prm_best_of_n_min": 0.5,
    "orm_weighted_vote": 0.5,
    "prm_weighted_vote": 0.5,
}


def _text(problem, answer, num_steps):
    steps = "".join(f"step {i}\n" for i in range(num_steps))
    visible = (
        "I give up." if answer is None else f"Answer: {problem.answer if answer == 'T' else answer}"
    )
    return (
        f"<|thinking_block|><|headline|>Add\n<|thoughts|>{steps}<|summary|>Columns.\n"
        f"<|end_thinking_block|>\n{visible}"
    )


def _generation(problem, answer, num_steps):
    text = _text(problem, answer, num_steps)
    tokens = np.arange(len(text) // 4, dtype=np.int32)  # a length, as the sampler reports one
    return Generation(problem.prompt, text, tokens, np.zeros(len(tokens)), True)


@pytest.fixture(scope="module")
def generations():
    return [
        [_generation(p, answer, len(steps)) for answer, _, steps in row]
        for p, row in zip(PROBLEMS, CANDIDATES, strict=True)
    ]


@pytest.fixture(scope="module")
def table(generations):
    orm = [[ResponseScore(orm, np.zeros(0)) for _, orm, _ in row] for row in CANDIDATES]
    prm = [[ResponseScore(0.0, np.asarray(s, np.float32)) for *_, s in row] for row in CANDIDATES]
    return rerank.build_table(PROBLEMS, generations, orm_scores=orm, prm_scores=prm)


def test_table_holds_answers_verdicts_lengths_and_scores(table, generations):
    assert table.answers[0] == [WRONG, PROBLEMS[0].answer, WRONG, OTHER]
    assert table.answers[1][3] is None
    np.testing.assert_array_equal(table.correct_PxN, [[0, 1, 0, 0], [1, 0, 1, 0]])
    assert table.lengths_PxN[1, 2] == len(generations[1][2].tokens)
    np.testing.assert_allclose(table.orm_PxN[0], [0.9, 0.3, 0.2, 0.1])
    assert table.prm_probs_PxNxS.shape == (2, 4, 4)
    np.testing.assert_array_equal(table.prm_mask_PxNxS.sum(-1), [[2, 3, 2, 1], [4, 2, 1, 0]])


@pytest.mark.parametrize("name", sorted(EXPECTED_CHOICE))
def test_each_method_picks_the_expected_candidate(table, name):
    np.testing.assert_array_equal(rerank.METHODS[name].select(table), EXPECTED_CHOICE[name])
    assert rerank.method_accuracy(table, name) == pytest.approx(EXPECTED_ACCURACY[name])


def test_curves_share_subsets_and_end_at_the_full_pool(table):
    curves = rerank.accuracy_curves(table, [1, 2, 4], num_draws=16, seed=0)
    assert set(curves) == set(EXPECTED_CHOICE) | {rerank.ORACLE}
    for name, expected in EXPECTED_ACCURACY.items():
        assert curves[name]["mean"][-1] == pytest.approx(expected)
        assert curves[name]["std"][-1] == 0.0
    # With one candidate every method keeps it, and every method saw the same subsets.
    at_one = {curves[name]["mean"][0] for name in EXPECTED_CHOICE}
    assert len(at_one) == 1
    np.testing.assert_allclose(curves[rerank.ORACLE]["mean"], [0.375, 1 - 0.5 * (1 / 6 + 1 / 2), 1])


def test_methods_need_their_scores(generations):
    table = rerank.build_table(PROBLEMS, generations)
    assert rerank.available_methods(table) == ["majority_vote"]
    with pytest.raises(ValueError, match="orm_best_of_n"):
        rerank.method_accuracy(table, "orm_best_of_n")
    assert set(rerank.accuracy_curves(table, [1, 4], num_draws=2)) == {
        "majority_vote",
        rerank.ORACLE,
    }


def test_take_keeps_the_named_candidates(table):
    sub = table.take(np.array([[1, 3], [0, 2]]))
    assert sub.answers == [[PROBLEMS[0].answer, OTHER], [PROBLEMS[1].answer, PROBLEMS[1].answer]]
    np.testing.assert_array_equal(sub.correct_PxN, [[1, 0], [1, 1]])
    np.testing.assert_allclose(sub.orm_PxN, [[0.3, 0.1], [0.4, 0.45]])
    assert sub.prm_probs_PxNxS.shape == (2, 2, 4)


def test_mismatched_tables_are_rejected(table):
    with pytest.raises(ValueError, match=r"\[P\]\[N\]"):
        rerank.CandidateTable([["1"]], np.zeros((1, 2), bool), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="orm_PxN"):
        rerank.CandidateTable(table.answers, table.correct_PxN, table.lengths_PxN, np.zeros((2, 3)))


def test_reward_scores_scores_every_candidate_once_in_order(monkeypatch, generations):
    calls = []

    def fake_score_tokens(rm, prompts, responses, *, batch_size):
        calls.append((len(prompts), batch_size))
        return [ResponseScore(float(len(r)), np.zeros(0)) for r in responses]

    monkeypatch.setattr("rl.reward_model.score_tokens", fake_score_tokens)
    monkeypatch.setattr(rerank, "user_prompt_tokens", lambda tokenizer, q: [1, 2])
    rm = types.SimpleNamespace(tokenizer=None)
    scores = rerank.reward_scores(rm, PROBLEMS, generations, batch_size=8)
    assert calls == [(8, 8)]
    assert [[s.final for s in row] for row in scores] == [
        [float(len(g.tokens)) for g in row] for row in generations
    ]


def test_a_cut_off_candidate_never_wins_a_prm_rerank():
    # Cut off before its answer, the second candidate has only its (better) thought steps;
    # the finished one also carries its answer step, so its product is lower.
    problem = PROBLEMS[0]
    finished = _generation(problem, "T", 2)
    cut = dataclasses.replace(_generation(problem, None, 2), finished=False)
    prm = [
        [
            ResponseScore(0.0, np.asarray([0.9, 0.9, 0.8], np.float32)),
            ResponseScore(0.0, np.asarray([0.99, 0.99], np.float32)),
        ]
    ]
    table = rerank.build_table([problem], [[finished, cut]], prm_scores=prm)
    np.testing.assert_array_equal(table.prm_mask_PxNxS.sum(-1), [[3, 0]])
    for name in ("prm_best_of_n_product", "prm_best_of_n_min", "prm_weighted_vote"):
        np.testing.assert_array_equal(rerank.METHODS[name].select(table), [0])


def test_format_check_leaves_malformed_candidates_out_when_a_well_formed_one_exists():
    problem = PROBLEMS[0]
    right = _generation(problem, "T", 2)
    # A stray marker inside the thoughts: it parses to the same wrong answer twice.
    broken_text = _text(problem, WRONG, 2).replace("step 1", "<|headline|>step 1")
    broken = dataclasses.replace(_generation(problem, WRONG, 2), text=broken_text)
    assert rerank.is_well_formed(right.text) and not rerank.is_well_formed(broken_text)
    # A headline that runs into the steps: a block without thoughts in a fresh response.
    run_on = right.text.replace("Add\n<|thoughts|>", "Add ")
    assert parse_assistant(run_on).answer is not None and not parse_assistant(run_on).malformed
    assert not rerank.is_well_formed(run_on)
    candidates = [[broken, broken, right]]
    orm = [[ResponseScore(score, np.zeros(0)) for score in (0.9, 0.9, 0.4)]]
    prm = [[ResponseScore(0.0, np.asarray(s, np.float32)) for s in ([0.9], [0.9], [0.5])]]
    plain = rerank.build_table([problem], candidates, orm_scores=orm, prm_scores=prm)
    checked = rerank.build_table(
        [problem], candidates, orm_scores=orm, prm_scores=prm, format_check=True
    )
    np.testing.assert_array_equal(checked.well_formed_PxN, [[False, False, True]])
    for name in rerank.METHODS:
        assert rerank.method_accuracy(plain, name) == 0.0, name
        assert rerank.method_accuracy(checked, name) == 1.0, name
    # With no well-formed candidate at all, every candidate stays eligible.
    only_broken = checked.take(np.array([[0, 1]]))
    np.testing.assert_array_equal(only_broken.eligible_PxN(), [[True, True]])
    assert rerank.METHODS["majority_vote"].select(only_broken).tolist() == [0]
