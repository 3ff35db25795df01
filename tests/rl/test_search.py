"""Selection over candidates: each method picks its own known answer from one hand-made table."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from rl import search

# One problem, nine candidates. Each selection rule below picks a different answer.
ANSWERS = [["A", "A", "A", "B", "C", "C", "D", "E", "F"]]
ORM = np.array([[0.2, 0.2, 0.2, 0.9, 0.5, 0.5, 0.1, 0.1, 0.05]])
STEPS = [
    [
        [0.6, 0.9],  # A: min 0.6, product 0.54, last 0.9
        [0.6, 0.9],
        [0.6, 0.9],
        [0.5],  # B
        [0.7, 0.5],  # C
        [0.1, 0.95],  # C
        [0.8, 0.8, 0.8, 0.8],  # D: the best min (0.8), product only 0.41
        [0.95, 0.7],  # E: the best product (0.665)
        [0.2, 0.99],  # F: the best last step
    ]
]


def prm_pick(how):
    probs, mask = search.pad_steps(STEPS)
    return search.pick(ANSWERS, search.best_of_n(search.prm_aggregate(probs, mask, how)))


def test_each_method_picks_its_known_answer():
    assert search.pick(ANSWERS, search.best_of_n(ORM)) == ["B"]
    assert search.majority_vote(ANSWERS) == ["A"]
    assert search.weighted_vote(ANSWERS, ORM) == ["C"]  # C 1.0 > B 0.9 > A 0.6
    assert prm_pick("min") == ["D"]
    assert prm_pick("product") == ["E"]
    assert prm_pick("last") == ["F"]


def test_prm_aggregate_values_and_empty_candidates():
    probs, mask = search.pad_steps([[[0.5, 0.4], [0.9], []], [[0.2, 0.3], [1.0], [0.7, 0.6]]])
    assert probs.shape == mask.shape == (2, 3, 2)
    prod = search.prm_aggregate(probs, mask, "product")
    np.testing.assert_allclose(prod, [[0.2, 0.9, 0.0], [0.06, 1.0, 0.42]], rtol=1e-6)
    np.testing.assert_allclose(
        search.prm_aggregate(probs, mask, "min"), [[0.4, 0.9, 0.0], [0.2, 1.0, 0.6]], rtol=1e-6
    )
    np.testing.assert_allclose(
        search.prm_aggregate(probs, mask, "last", empty_score=0.5),
        [[0.4, 0.9, 0.5], [0.3, 1.0, 0.6]],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="product"):
        search.prm_aggregate(probs, mask, "mean")


def test_prm_product_in_log_space_ranks_long_traces_without_underflow():
    # 300 steps at 0.5 vs 0.4 both underflow float32 as probabilities, but not as logs.
    probs = np.stack([np.full(300, 0.4), np.full(300, 0.5)])[None].astype(np.float32)
    mask = np.ones_like(probs)
    logs = search.prm_aggregate(probs, mask, "product", log=True)
    np.testing.assert_allclose(logs, [[300 * math.log(0.4), 300 * math.log(0.5)]], rtol=1e-5)
    assert int(search.best_of_n(logs)[0]) == 1


def test_best_of_n_ties_go_to_lowest_index_and_nan_loses():
    scores = np.array([[0.3, 0.7, 0.7], [np.nan, 0.1, 0.1], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(search.best_of_n(scores), [1, 1, 0])


def test_votes_ignore_none_and_break_ties_by_first_appearance():
    answers = [
        [None, None, "7", None],  # None never wins while something parsed
        [None, None, None, None],  # ... unless nothing did
        ["x", "y", "y", "x"],  # tie: x appears first
        ["y", "x", "x", "y"],
    ]
    assert search.majority_vote(answers) == ["7", None, "x", "y"]
    weights = np.array([[5, 5, 0.1, 5], [1, 1, 1, 1], [1, 2, 1, 3], [1.0, 1, 1, 1]])
    assert search.weighted_vote(answers, weights) == ["7", None, "x", "y"]


def test_weighted_vote_rejects_bad_weights():
    with pytest.raises(ValueError, match=">= 0"):
        search.weighted_vote([["a", "b"]], np.array([[0.5, -1.0]]))
    with pytest.raises(ValueError, match="candidates"):
        search.weighted_vote([["a", "b", "c"]], np.array([[0.5, 1.0]]))


def test_accuracy_and_correctness():
    assert search.accuracy(["1", None, "3", "4"], ["1", "2", "3", "5"]) == 0.5
    np.testing.assert_array_equal(
        search.correctness([["1", None], ["2", "3"]], ["1", "3"]), [[True, False], [False, True]]
    )
    with pytest.raises(ValueError, match="true answers"):
        search.accuracy(["1"], ["1", "2"])


def test_pass_at_n_matches_the_closed_form():
    num = 6
    for c in range(num + 1):
        correct = np.zeros((1, num), bool)
        correct[0, :c] = True
        for n in range(1, num + 1):
            want = 1.0 - math.comb(num - c, n) / math.comb(num, n)
            np.testing.assert_allclose(search.pass_at_n(correct, n), [want], atol=1e-6)
    np.testing.assert_allclose(search.pass_at_n(np.array([[1, 0, 0, 1]]), 1), [0.5])
    with pytest.raises(ValueError, match="n <= N"):
        search.pass_at_n(correct, num + 1)


def test_subsample_curve_of_oracle_selection_estimates_pass_at_n():
    rng = np.random.default_rng(0)
    correct = rng.random((40, 8)) < 0.2
    seen_sizes = set()

    def oracle(idx_pxn):
        # Indices are distinct, sorted and inside the pool.
        assert np.all(np.diff(idx_pxn, axis=1) > 0) and idx_pxn.min() >= 0 and idx_pxn.max() < 8
        seen_sizes.add(idx_pxn.shape[1])
        return float(np.mean(search.take_candidates(correct, idx_pxn).any(axis=1)))

    mean_k, std_k = search.subsample_curve(
        oracle, [1, 2, 4, 8], num_draws=300, rng=1, num_problems=40, pool_size=8
    )
    want_k = [float(search.pass_at_n(correct, n).mean()) for n in (1, 2, 4, 8)]
    np.testing.assert_allclose(mean_k, want_k, atol=0.02)
    assert std_k[-1] == 0.0 and std_k[0] > 0
    assert seen_sizes == {1, 2, 4, 8}


def test_take_candidates_on_lists_and_arrays():
    idx = np.array([[2, 0], [1, 2]])
    assert search.take_candidates([["a", "b", "c"], ["d", "e", "f"]], idx) == [
        ["c", "a"],
        ["e", "f"],
    ]
    table = np.arange(2 * 3 * 2).reshape(2, 3, 2)
    np.testing.assert_array_equal(
        search.take_candidates(table, idx), [[[4, 5], [0, 1]], [[8, 9], [10, 11]]]
    )


def test_beam_select_on_a_hand_table():
    beams = np.array([-1.0, -0.5])
    steps = np.array([[-0.1, -2.0, -0.3], [-0.6, -0.2, -np.inf]])
    # Totals: [[-1.1, -3.0, -1.3], [-1.1, -0.7, -inf]]; the -1.1 tie goes to beam 0 first.
    parent, cand, score = jax.jit(search.beam_select, static_argnums=2)(beams, steps, 3)
    np.testing.assert_array_equal(parent, [1, 0, 1])
    np.testing.assert_array_equal(cand, [1, 0, 0])
    np.testing.assert_allclose(score, [-0.7, -1.1, -1.1], rtol=1e-6)
    with pytest.raises(ValueError, match="beam_width"):
        search.beam_select(beams, steps, 7)
