"""Reranking N sampled candidates per problem: per-candidate tables, then every selection method.

A `CandidateTable` holds, for P problems with N candidates each, the parsed answers, whether
the task verifier accepts each candidate, its length in tokens, its ORM probability and its
PRM step probabilities. `build_table` fills it from `rl.generate` samples, scoring all P * N
candidates with each reward model in fixed-shape batches (`rl.reward_model.score_tokens`).
The selection methods (`METHODS`) read a table, or a column subset of one
(`CandidateTable.take`), and return the chosen candidate of each problem, so accuracy is
the verifier's verdict on that candidate. Voting methods choose an answer and return its first
candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from data.format import parse_assistant
from data.tasks import verify
from data.tasks.base import Problem
from rl import search
from rl.generate import Generation, generate, user_prompt_tokens

ORACLE = "oracle_pass@n"


@dataclasses.dataclass(frozen=True)
class CandidateTable:
    """Per-candidate facts of P problems x N candidates."""

    answers: list[list[str | None]]  # [P][N] parsed `Answer:` values (None: unparseable)
    correct_PxN: np.ndarray  # bool, the task verifier's verdict
    lengths_PxN: np.ndarray  # int, response tokens sampled (the compute a candidate cost)
    orm_PxN: np.ndarray | None = None  # ORM probability of each candidate
    prm_probs_PxNxS: np.ndarray | None = None  # PRM probability of each step
    prm_mask_PxNxS: np.ndarray | None = None  # 1 where a step exists
    # bool: passes the format check (data.format.ParsedResponse.well_formed); None: every
    # candidate is eligible
    well_formed_PxN: np.ndarray | None = None

    def __post_init__(self):
        shape = np.shape(self.correct_PxN)
        if len(shape) != 2 or [len(row) for row in self.answers] != [shape[1]] * shape[0]:
            raise ValueError(f"answers must be a [P][N] table matching correct_PxN {shape}")
        for name in (
            "lengths_PxN",
            "orm_PxN",
            "prm_probs_PxNxS",
            "prm_mask_PxNxS",
            "well_formed_PxN",
        ):
            value = getattr(self, name)
            if value is not None and np.shape(value)[:2] != shape:
                raise ValueError(f"{name} has shape {np.shape(value)}, expected {shape} first")
        if (self.prm_probs_PxNxS is None) != (self.prm_mask_PxNxS is None):
            raise ValueError("give both PRM step probabilities and their mask, or neither")

    @property
    def pool_size(self) -> int:
        """N, the candidates per problem."""
        return int(np.shape(self.correct_PxN)[1])

    def take(self, idx_Pxn: np.ndarray) -> CandidateTable:
        """The table restricted to candidates idx_Pxn[p] of each problem p."""

        def sub(table):
            return None if table is None else search.take_candidates(table, idx_Pxn)

        return CandidateTable(
            answers=sub(self.answers),
            correct_PxN=sub(self.correct_PxN),
            lengths_PxN=sub(self.lengths_PxN),
            orm_PxN=sub(self.orm_PxN),
            prm_probs_PxNxS=sub(self.prm_probs_PxNxS),
            prm_mask_PxNxS=sub(self.prm_mask_PxNxS),
            well_formed_PxN=sub(self.well_formed_PxN),
        )

    def eligible_PxN(self) -> np.ndarray:
        """Candidates a method may choose: the well-formed ones, or all of a problem's
        candidates when none of them is."""
        if self.well_formed_PxN is None:
            return np.ones(np.shape(self.correct_PxN), bool)
        well_formed_PxN = np.asarray(self.well_formed_PxN, bool)
        return well_formed_PxN | ~well_formed_PxN.any(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- building


def sample_candidates(
    params,
    model_cfg,
    tokenizer,
    problems: Sequence[Problem],
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    rng,
) -> list[list[Generation]]:
    """`num_samples` sampled responses to each problem's prompt."""
    return generate(
        params,
        model_cfg,
        tokenizer,
        [p.prompt for p in problems],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_samples=num_samples,
        greedy=False,
        temperature=temperature,
        rng=rng,
    )


def judge(problem: Problem, text: str) -> tuple[str | None, bool]:
    """(parsed answer, verifier verdict) of one response; never raises."""
    parsed = parse_assistant(text)
    # The verifier reads the visible answer, as train.evaluate scores greedy answers.
    visible = parsed.turn.content or text
    return parsed.answer, verify(problem, visible) > 0


def reward_scores(rm, problems: Sequence[Problem], generations, *, batch_size: int = 16):
    """`rl.reward_model.ResponseScore`s [P][N] of every candidate, all scored in one pass."""
    from rl.reward_model import score_tokens

    prompts = [user_prompt_tokens(rm.tokenizer, p.prompt) for p in problems]
    flat_prompts = [prompts[p] for p, row in enumerate(generations) for _ in row]
    flat_responses = [g.tokens for row in generations for g in row]
    flat = score_tokens(rm, flat_prompts, flat_responses, batch_size=batch_size)
    n = len(generations[0]) if generations else 0
    return [flat[p * n : (p + 1) * n] for p in range(len(generations))]


def build_table(
    problems: Sequence[Problem],
    generations: Sequence[Sequence[Generation]],
    *,
    orm_scores=None,
    prm_scores=None,
    format_check: bool = False,
) -> CandidateTable:
    """The table of sampled candidates; scores are `ResponseScore`s [P][N] (see reward_scores).

    With `format_check`, every method chooses among the well-formed candidates of a problem
    (`is_well_formed`), if it has any. A sampled response that
    breaks the format (a stray marker inside the thoughts, say) hides its steps from the
    step parser, so a reward model judges it on what little it can see; at large N some such
    response outscores every well-formed one. The check needs no model, and voting gets it too.
    """
    if len(problems) != len(generations):
        raise ValueError(f"{len(problems)} problems but {len(generations)} candidate lists")
    judged = [[judge(p, g.text) for g in row] for p, row in zip(problems, generations, strict=True)]
    well_formed = None
    if format_check:
        well_formed = np.array(
            [[is_well_formed(g.text) for g in row] for row in generations], bool
        ).reshape(len(problems), -1)
    probs, mask = (None, None)
    if prm_scores is not None:
        probs, mask = search.pad_steps([[s.steps for s in row] for row in prm_scores])
        # A candidate cut off before its answer has no answer step to judge, so its thought
        # steps alone would outrank a finished candidate (which pays for its answer step).
        # Without steps, search.prm_aggregate ranks it last: it has no answer to give anyway.
        finished_PxN = np.array([[g.finished for g in row] for row in generations], bool)
        mask = mask * finished_PxN.reshape(len(problems), -1)[..., None]
    return CandidateTable(
        answers=[[answer for answer, _ in row] for row in judged],
        correct_PxN=np.array([[ok for _, ok in row] for row in judged], bool).reshape(
            len(problems), -1
        ),
        lengths_PxN=np.array([[len(g.tokens) for g in row] for row in generations]).reshape(
            len(problems), -1
        ),
        orm_PxN=None
        if orm_scores is None
        else np.array([[s.final for s in row] for row in orm_scores], np.float32),
        prm_probs_PxNxS=probs,
        prm_mask_PxNxS=mask,
        well_formed_PxN=well_formed,
    )


def is_well_formed(text: str) -> bool:
    """The format check (`ParsedResponse.well_formed`); never raises.

    A response whose headline ran into its steps (no thoughts in its block) was among a PRM's
    top picks at N=64: a product over almost no steps (0.4% of the multiplication samples,
    none of them right).
    """
    return parse_assistant(text).well_formed


# ----------------------------------------------------------------------------- methods


def _first_with(answers: Sequence[Sequence[str | None]], chosen: Sequence[str | None]):
    """Index of the first candidate holding each problem's chosen answer (0 if None)."""
    return np.array(
        [row.index(c) if c is not None else 0 for row, c in zip(answers, chosen, strict=True)]
    )


def _prm_score(table: CandidateTable, how: str) -> np.ndarray:
    """PRM candidate scores [P, N] by `how` ("product" or "min")."""
    return np.asarray(search.prm_aggregate(table.prm_probs_PxNxS, table.prm_mask_PxNxS, how))


def _answers(table: CandidateTable) -> list[list[str | None]]:
    """Parsed answers, None where not eligible (no vote)."""
    eligible_PxN = table.eligible_PxN()
    return [
        [answer if ok else None for answer, ok in zip(row, eligible_N, strict=True)]
        for row, eligible_N in zip(table.answers, eligible_PxN, strict=True)
    ]


def _best(scores_PxN: np.ndarray, table: CandidateTable) -> np.ndarray:
    """Best-of-N among the eligible candidates."""
    return np.asarray(search.best_of_n(np.where(table.eligible_PxN(), scores_PxN, -np.inf)))


def _vote(table: CandidateTable, weights_PxN: np.ndarray | None = None) -> np.ndarray:
    """The first candidate holding the (weighted) vote's answer among eligible candidates
    (an ineligible one has no answer, so its weight counts for nothing)."""
    answers = _answers(table)
    chosen = (
        search.majority_vote(answers)
        if weights_PxN is None
        else search.weighted_vote(answers, weights_PxN)
    )
    return _first_with(answers, chosen)


@dataclasses.dataclass(frozen=True)
class Method:
    """A selection method: which reward model it needs and its candidate choice."""

    needs: str  # "", "orm" or "prm"
    select: Callable[[CandidateTable], np.ndarray]  # table -> chosen index per problem


METHODS: dict[str, Method] = {
    "majority_vote": Method("", _vote),
    "orm_best_of_n": Method("orm", lambda t: _best(t.orm_PxN, t)),
    "prm_best_of_n_product": Method("prm", lambda t: _best(_prm_score(t, "product"), t)),
    "prm_best_of_n_min": Method("prm", lambda t: _best(_prm_score(t, "min"), t)),
    "orm_weighted_vote": Method("orm", lambda t: _vote(t, t.orm_PxN)),
    "prm_weighted_vote": Method("prm", lambda t: _vote(t, _prm_score(t, "product"))),
}


def available_methods(table: CandidateTable) -> list[str]:
    """The methods whose reward model the table has scores from."""
    have = {"": True, "orm": table.orm_PxN is not None, "prm": table.prm_probs_PxNxS is not None}
    return [name for name, method in METHODS.items() if have[method.needs]]


def method_accuracy(table: CandidateTable, name: str) -> float:
    """Fraction of problems where method `name` picks a candidate the verifier accepts."""
    if name not in available_methods(table):
        raise ValueError(
            f"method {name!r} is unknown or lacks its scores; have {available_methods(table)}"
        )
    chosen_P = METHODS[name].select(table)
    return float(np.mean(np.take_along_axis(table.correct_PxN, chosen_P[:, None], axis=1)))


def oracle_curve(table: CandidateTable, n_values: Sequence[int]) -> np.ndarray:
    """Mean unbiased pass@n for each n: some candidate among n is right."""
    return np.array([float(np.mean(search.pass_at_n(table.correct_PxN, n))) for n in n_values])


def accuracy_curves(
    table: CandidateTable, n_values: Sequence[int], *, num_draws: int, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Accuracy vs N of every available method (same random subsets for all) and the oracle.

    Returns {method: {"n": [...], "mean": [...], "std": [...]}}; std is over subsets.
    """
    curves = {}
    for name in available_methods(table):
        mean_K, std_K = search.subsample_curve(
            lambda idx, name=name: method_accuracy(table.take(idx), name),
            n_values,
            num_draws,
            seed,  # one seed for all methods: every method sees the same subsets
            num_problems=len(table.answers),
            pool_size=table.pool_size,
        )
        curves[name] = {"n": list(n_values), "mean": mean_K.tolist(), "std": std_K.tolist()}
    curves[ORACLE] = {
        "n": list(n_values),
        "mean": oracle_curve(table, n_values).tolist(),
        "std": [0.0] * len(n_values),
    }
    return curves
