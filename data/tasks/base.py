"""The shared shape of a verifiable task: a problem with its full step trace.

Every task family produces `Problem`s. A problem carries everything the rest of the
recipe needs: the canonical prompt, the thinking trace (headline, one step per line,
summary), the visible answer text and the value a verifier accepts. Corrupted traces
record the index of their first wrong step, which the process reward model learns from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a task family, with its worked thinking trace."""

    task: str  # family name, e.g. "addition"
    prompt: str  # the user question in canonical form
    answer: str  # the final value a verifier accepts, e.g. "5758"
    headline: str  # what the thinking block is about
    steps: tuple[str, ...]  # one thought step per line; never contains "\n"
    summary: str  # one-line summary of how the steps got there
    response: str  # visible answer text; its last line is "Answer: <value>"
    first_error_step: int = -1  # index into `steps` of the first wrong step; -1 if clean
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-serializable


class TaskFamily(Protocol):
    """A family of deterministic, machine-checkable problems."""

    name: str

    def generate(self, rng: np.random.Generator, **knobs: Any) -> Problem:
        """Draws one problem; `knobs` set the difficulty (e.g. digits=3)."""
        ...

    def verify(self, problem: Problem, response: str) -> float:
        """Scores a model response (visible text) in [0, 1]; never raises."""
        ...

    def corrupt(self, problem: Problem, step: int, rng: np.random.Generator) -> Problem:
        """Injects a realistic first mistake at `step` and propagates it to the answer."""
        ...

    def check_steps(self, problem: Problem, steps: tuple[str, ...]) -> int:
        """Index of the first wrong step of a (sampled) trace, -1 if none; never raises."""
        ...
