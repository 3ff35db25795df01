"""Reward-guided selection over sampled candidates: best-of-N, voting, pass@n, beam selection.

Shapes (suffixes):
  P  problems            N  candidates per problem      S  reasoning steps of a candidate
  B  live beams          C  candidate next steps per beam
  W  beam width (expansions kept)                       K  points of a scaling curve

Inputs are per-candidate tables: `answers[p][i]` is the parsed answer of candidate i of problem
p (None when unparseable), ORM scores are [P, N], PRM step probabilities [P, N, S] with a step
mask (`pad_steps` builds both from ragged lists). No model is called here. Numeric parts are
jnp (jittable); string answers are plain Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Answers = Sequence[Sequence[str | None]]


def _check_rows(answers: Answers, num_problems: int, num_candidates: int | None = None) -> None:
    """Raises if the answers table does not have the given number of rows (and columns)."""
    if len(answers) != num_problems:
        raise ValueError(f"answers has {len(answers)} problems, expected {num_problems}")
    if num_candidates is not None:
        for p, row in enumerate(answers):
            if len(row) != num_candidates:
                raise ValueError(
                    f"answers[{p}] has {len(row)} candidates, expected {num_candidates}"
                )


def best_of_n(scores_PxN: Array) -> Array:
    """Index of the highest-scoring candidate per problem; ties go to the lowest index."""
    scores_PxN = jnp.asarray(scores_PxN)
    # NaN would win argmax; a candidate the scorer failed on should lose instead.
    return jnp.argmax(jnp.where(jnp.isnan(scores_PxN), -jnp.inf, scores_PxN), axis=1)


def pick(answers: Answers, index_P: Array | Sequence[int]) -> list[str | None]:
    """The answer of candidate `index_P[p]` of each problem p."""
    index_P = np.asarray(index_P)
    _check_rows(answers, len(index_P))
    return [row[int(i)] for row, i in zip(answers, index_P, strict=True)]


def pad_steps(step_probs: Sequence[Sequence[Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Pads ragged per-candidate step probabilities into ([P, N, S] probs, [P, N, S] mask)."""
    num_candidates = {len(row) for row in step_probs}
    if len(num_candidates) > 1:
        raise ValueError(f"every problem needs the same number of candidates, got {num_candidates}")
    n = num_candidates.pop() if num_candidates else 0
    s = max((len(steps) for row in step_probs for steps in row), default=0)
    probs_PxNxS = np.zeros((len(step_probs), n, max(s, 1)), np.float32)
    mask_PxNxS = np.zeros_like(probs_PxNxS)
    for p, row in enumerate(step_probs):
        for i, steps in enumerate(row):
            probs_PxNxS[p, i, : len(steps)] = steps
            mask_PxNxS[p, i, : len(steps)] = 1.0
    return probs_PxNxS, mask_PxNxS


def prm_aggregate(
    step_probs_PxNxS: Array,
    step_mask_PxNxS: Array,
    how: str = "product",
    empty_score: float = 0.0,
    log: bool = False,
) -> Array:
    """Candidate score from its PRM step probabilities: their "product", "min" or "last".

    The product is summed in log space, so long traces do not underflow before the final exp;
    `log=True` returns the log-score itself (same ranking, no underflow at all). A candidate with
    no valid step gets `empty_score` (default 0: a trace with no steps never wins a rerank).
    """
    if how not in ("product", "min", "last"):
        raise ValueError(f"unknown PRM aggregation {how!r}; use 'product', 'min' or 'last'")
    valid_PxNxS = jnp.asarray(step_mask_PxNxS) > 0
    probs_PxNxS = jnp.clip(jnp.asarray(step_probs_PxNxS, jnp.float32), 0.0, 1.0)
    logp_PxNxS = jnp.log(jnp.where(valid_PxNxS, probs_PxNxS, 1.0))
    if how == "product":
        score_PxN = jnp.sum(logp_PxNxS, axis=-1)
    elif how == "min":
        score_PxN = jnp.min(jnp.where(valid_PxNxS, logp_PxNxS, jnp.inf), axis=-1)
    else:
        num_steps = valid_PxNxS.shape[-1]
        last_PxN = num_steps - 1 - jnp.argmax(valid_PxNxS[..., ::-1], axis=-1)
        score_PxN = jnp.take_along_axis(logp_PxNxS, last_PxN[..., None], axis=-1)[..., 0]
    empty_PxN = ~jnp.any(valid_PxNxS, axis=-1)
    score_PxN = jnp.where(empty_PxN, jnp.log(jnp.float32(empty_score)), score_PxN)
    return score_PxN if log else jnp.exp(score_PxN)


def _vote(row: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The answer with the largest total weight; ties go to the answer seen first."""
    totals: dict[str, float] = {}  # insertion-ordered, which breaks ties by first appearance
    for answer, weight in zip(row, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    # max keeps the first of equal keys, i.e. the earliest answer.
    return max(totals, key=totals.__getitem__) if totals else None


def majority_vote(answers: Answers) -> list[str | None]:
    """Most frequent parsed answer per problem (None only if all are None; ties: first seen)."""
    return [_vote(row, [1.0] * len(row)) for row in answers]


def weighted_vote(answers: Answers, weights_PxN: Array) -> list[str | None]:
    """Answer with the largest summed weight per problem, e.g. ORM probabilities as weights.

    Weights must be finite and non-negative (pass probabilities, not logits). None answers get
    no vote; ties go to the answer seen first.
    """
    weights_PxN = np.asarray(weights_PxN, np.float64)
    if weights_PxN.ndim != 2:
        raise ValueError(f"weights must be [P, N], got shape {weights_PxN.shape}")
    _check_rows(answers, *weights_PxN.shape)
    if not np.all(np.isfinite(weights_PxN)) or np.any(weights_PxN < 0):
        raise ValueError("weights must be finite and >= 0; map ORM/PRM logits through a sigmoid")
    return [_vote(row, w_N) for row, w_N in zip(answers, weights_PxN, strict=True)]


def accuracy(selected: Sequence[str | None], truths: Sequence[str]) -> float:
    """Fraction of problems whose selected answer equals the true one (None is wrong)."""
    if len(selected) != len(truths):
        raise ValueError(f"{len(selected)} selected answers for {len(truths)} true answers")
    if not truths:
        return 0.0
    hits = sum(s is not None and s == t for s, t in zip(selected, truths, strict=True))
    return hits / len(truths)


def correctness(answers: Answers, truths: Sequence[str]) -> np.ndarray:
    """[P, N] bool table: candidate i of problem p has the true answer."""
    _check_rows(answers, len(truths))
    return np.array(
        [[a is not None and a == t for a in row] for row, t in zip(answers, truths, strict=True)],
        dtype=bool,
    )


def pass_at_n(correct_PxN: Array, n: int) -> Array:
    """Unbiased pass@n per problem from N >= n samples: 1 - C(N - c, n) / C(N, n) (Chen et al.).

    Computed as 1 - prod_{i = N-c+1}^{N} (1 - n / i), which never forms a large binomial. Take
    the mean over problems for the benchmark number.
    """
    correct_PxN = jnp.asarray(correct_PxN)
    num = correct_PxN.shape[1]
    if not 1 <= n <= num:
        raise ValueError(f"pass@n needs 1 <= n <= N = {num}, got n = {n}")
    c_Px1 = jnp.sum(correct_PxN > 0, axis=1, keepdims=True)
    i_N = jnp.arange(1, num + 1, dtype=jnp.float32)
    # When N - c < n the range contains i = n, whose factor 0 makes pass@n exactly 1.
    factors_PxN = jnp.where(i_N > num - c_Px1, 1.0 - n / i_N, 1.0)
    return 1.0 - jnp.prod(factors_PxN, axis=1)


def take_candidates(table, idx_Pxn: np.ndarray):
    """Keeps the candidates idx_Pxn names of a table (list of lists, or [P, N, ...] array)."""
    idx_Pxn = np.asarray(idx_Pxn)
    if isinstance(table, (np.ndarray, jax.Array)):
        table = np.asarray(table)
        idx = idx_Pxn.reshape(idx_Pxn.shape + (1,) * (table.ndim - 2))
        return np.take_along_axis(table, idx, axis=1)
    return [[row[int(i)] for i in cols] for row, cols in zip(table, idx_Pxn, strict=True)]


def subsample_curve(
    fn: Callable[[np.ndarray], float],
    n_values: Sequence[int],
    num_draws: int,
    rng: np.random.Generator | int,
    *,
    num_problems: int,
    pool_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy-vs-N curve of a selection method from one pool of `pool_size` samples per problem.

    For each n, `fn(idx_Pxn)` is averaged over `num_draws` random subsets: each problem gets its
    own n distinct pool indices, kept in pool order so tie-breaks stay as in the full pool.
    `fn` slices its tables with `take_candidates` and returns an accuracy. Returns
    (mean_K, std_K) over draws; n = pool_size is one exact draw (std 0).
    """
    rng = np.random.default_rng(rng)
    means, stds = [], []
    for n in n_values:
        if not 1 <= n <= pool_size:
            raise ValueError(f"n = {n} must be in [1, pool_size = {pool_size}]")
        draws = 1 if n == pool_size else num_draws
        values = []
        for _ in range(draws):
            order_PxN = np.argsort(rng.random((num_problems, pool_size)), axis=1)
            values.append(float(fn(np.sort(order_PxN[:, :n], axis=1))))
        means.append(np.mean(values))
        stds.append(np.std(values))
    return np.asarray(means), np.asarray(stds)


def beam_select(
    beam_scores_B: Array, candidate_step_scores_BxC: Array, beam_width: int
) -> tuple[Array, Array, Array]:
    """Keeps the `beam_width` best expansions by cumulative log-score: (parent, candidate, score).

    An expansion's score is its beam's score plus the candidate step's log-score (e.g. log PRM
    probability). Mark absent candidates with -inf. Ties go to the lower flat index (beam-major),
    and the result is sorted best first. `beam_width` must be static under jit.
    """
    beam_scores_B = jnp.asarray(beam_scores_B, jnp.float32)
    candidate_step_scores_BxC = jnp.asarray(candidate_step_scores_BxC, jnp.float32)
    num_beams, num_cands = candidate_step_scores_BxC.shape
    if beam_scores_B.shape != (num_beams,):
        raise ValueError(f"beam scores {beam_scores_B.shape} do not match {num_beams} beams")
    if not 1 <= beam_width <= num_beams * num_cands:
        raise ValueError(f"beam_width must be in [1, {num_beams * num_cands}], got {beam_width}")
    total_BxC = beam_scores_B[:, None] + candidate_step_scores_BxC
    total_BxC = jnp.where(jnp.isnan(total_BxC), -jnp.inf, total_BxC)
    new_scores_W, flat_W = jax.lax.top_k(total_BxC.reshape(-1), beam_width)
    return flat_W // num_cands, flat_W % num_cands, new_scores_W
