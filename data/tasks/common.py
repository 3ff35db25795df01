"""What every step-traced task family shares: knobs, traces with injected faults, checking.

A family describes its problem by a JSON-serializable `meta` and writes its trace with a
`TraceBuilder`. The same trace function writes the clean trace and a corrupted one: a
*fault* `(step, kind, *params)` changes what happens at one step, and every later step is
computed from the changed state, so a corrupted trace stays self-consistent after its first
error. While it writes the clean trace, the builder also records the mistakes each step
admits, which is how `corrupt` picks a realistic one.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.tasks.answer import extract_answer
from data.tasks.base import Problem

SPLITS = ("train", "validation", "test")

Mistake = tuple  # (kind, *params): what goes wrong at one step
Fault = tuple  # (step, kind, *params): a mistake placed at a step


@dataclasses.dataclass
class TraceBuilder:
    """Collects steps and, per step, the mistakes that could be made there."""

    fault: Fault | None = None
    steps: list[str] = dataclasses.field(default_factory=list)
    mistakes: list[list[Mistake]] = dataclasses.field(default_factory=list)

    def mistake(self) -> Mistake | None:
        """The mistake to make in the step about to be written, if the fault is here."""
        if self.fault is not None and self.fault[0] == len(self.steps):
            return tuple(self.fault[1:])
        return None

    def add(self, line: str, mistakes: Sequence[Mistake] = ()) -> None:
        """Appends one step and the mistakes it admits."""
        self.steps.append(line)
        self.mistakes.append(list(mistakes))


@dataclasses.dataclass(frozen=True)
class Trace:
    """A written trace: its steps, the answer they reach, and each step's possible mistakes."""

    steps: tuple[str, ...]
    answer: str
    mistakes: tuple[tuple[Mistake, ...], ...]
    extra: Any = None  # family-specific output of the trace, e.g. the written code


def finish(builder: TraceBuilder, answer: str, extra: Any = None) -> Trace:
    """Freezes a builder into a `Trace`."""
    return Trace(
        steps=tuple(builder.steps),
        answer=answer,
        mistakes=tuple(tuple(options) for options in builder.mistakes),
        extra=extra,
    )


def normalize_step(step: str) -> str:
    """Canonical form of a step for comparison: no whitespace, no trailing period."""
    return "".join(step.split()).rstrip(".")


def first_mismatch(truth: Sequence[str], steps: Sequence[Any]) -> int:
    """Index of the first step that differs from `truth`, or the first missing one; -1 if none."""
    for index, expected in enumerate(truth):
        if index >= len(steps):
            return index
        step = steps[index]
        if not isinstance(step, str) or normalize_step(step) != normalize_step(expected):
            return index
    return len(truth) if len(steps) > len(truth) else -1


def check_split(split: Any) -> str:
    """Validates the `split` knob."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def resolve_knobs(task: str, defaults: Mapping[str, Any], knobs: Mapping[str, Any]) -> dict:
    """Defaults overridden by `knobs`; an unknown knob raises TypeError naming it."""
    known = {**defaults, "split": "train"}
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise TypeError(f"{task}: unknown knob(s) {unknown}; known knobs: {sorted(known)}")
    resolved = {**known, **knobs}
    check_split(resolved["split"])
    return resolved


def int_range(name: str, value: Any, minimum: int) -> tuple[int, int]:
    """An int knob or an inclusive (min, max) pair of ints, each at least `minimum`."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        low = high = int(value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value)
    ):
        low, high = int(value[0]), int(value[1])
    else:
        raise ValueError(f"knob {name} must be an int or a (min, max) pair of ints, got {value!r}")
    if not minimum <= low <= high:
        raise ValueError(f"knob {name} must satisfy {minimum} <= min <= max, got {value!r}")
    return low, high


def draw(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    """A uniform int in the inclusive range `bounds`."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def number_mistakes(value: int) -> list[Mistake]:
    """Copy slips for writing a non-negative int: one digit off by one, or two digits swapped."""
    text = str(value)
    options: list[Mistake] = []
    for pos, char in enumerate(text):
        for new in (int(char) - 1, int(char) + 1):
            if 0 <= new <= 9 and not (pos == 0 and new == 0 and len(text) > 1):
                options.append(("digit", pos, new))
    for pos in range(len(text) - 1):
        if text[pos] != text[pos + 1] and not (pos == 0 and text[1] == "0"):
            options.append(("swap", pos))
    return options


def apply_number_mistake(value: int, mistake: Mistake) -> int:
    """The int written with a slip from `number_mistakes`."""
    chars = list(str(value))
    if mistake[0] == "digit":
        chars[mistake[1]] = str(mistake[2])
    elif mistake[0] == "swap":
        pos = mistake[1]
        chars[pos], chars[pos + 1] = chars[pos + 1], chars[pos]
    return int("".join(chars))


def respond(sentence: str, answer: str) -> str:
    """The visible answer: a short sentence, then the `Answer:` line."""
    return f"{sentence}\nAnswer: {answer}"


class TraceTask(abc.ABC):
    """A task family whose problems come from one trace function over a JSON `meta`."""

    name: str
    summary: str
    defaults: Mapping[str, Any]

    @abc.abstractmethod
    def draw_meta(self, rng: np.random.Generator, **knobs: Any) -> dict:
        """Draws the JSON-serializable data that defines one problem."""

    @abc.abstractmethod
    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """Writes the trace of `meta`, with `fault` injected when given."""

    @abc.abstractmethod
    def prompt(self, meta: Mapping[str, Any]) -> str:
        """The canonical user question."""

    @abc.abstractmethod
    def headline(self, meta: Mapping[str, Any]) -> str:
        """What the thinking block is about."""

    @abc.abstractmethod
    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """The visible answer text for a trace."""

    @abc.abstractmethod
    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """Whether an extracted answer value is right; may raise on odd input."""

    def is_wrong(self, meta: Mapping[str, Any], clean: Trace, bad: Trace) -> bool:
        """Whether a corrupted trace ends wrong (by default: its answer changed)."""
        return not self.accepts(meta, bad.answer)

    def generate(self, rng: np.random.Generator, **knobs: Any) -> Problem:
        """Draws one problem; `knobs` set the difficulty."""
        resolved = resolve_knobs(self.name, self.defaults, knobs)
        return self.build(self.draw_meta(rng, **resolved))

    def build(self, meta: dict) -> Problem:
        """The clean problem of a `meta`."""
        trace = self.trace(meta)
        return Problem(
            task=self.name,
            prompt=self.prompt(meta),
            answer=trace.answer,
            headline=self.headline(meta),
            steps=trace.steps,
            summary=self.summary,
            response=self.response(meta, trace),
            meta=meta,
        )

    def verify(self, problem: Problem, response: str) -> float:
        """1.0 if the response's `Answer:` line is right, else 0.0; never raises."""
        try:
            value = extract_answer(response)
            return 1.0 if value is not None and self.accepts(problem.meta, value) else 0.0
        except Exception:  # a verifier scores malformed output 0, never raises
            return 0.0

    def find_corruption(
        self, meta: Mapping[str, Any], clean: Trace, step: int, order: Sequence[int]
    ) -> Trace | None:
        """The first trace, trying `step`'s mistakes in `order`, that errs there and ends wrong."""
        mistakes = clean.mistakes[step]
        for index in order:
            bad = self.trace(meta, (step, *mistakes[index]))
            if first_mismatch(clean.steps, bad.steps) == step and self.is_wrong(meta, clean, bad):
                return bad
        return None

    def corruptible(self, meta: Mapping[str, Any]) -> bool:
        """Whether every step admits a mistake that changes the outcome."""
        clean = self.trace(meta)
        return all(
            self.find_corruption(meta, clean, step, range(len(clean.mistakes[step]))) is not None
            for step in range(len(clean.steps))
        )

    def corrupt(self, problem: Problem, step: int, rng: np.random.Generator) -> Problem:
        """A realistic first mistake at `step`, propagated to a wrong answer."""
        clean = self.trace(problem.meta)
        if not 0 <= step < len(clean.steps):
            raise ValueError(f"{self.name}: step must be in [0, {len(clean.steps)}), got {step}")
        order = rng.permutation(len(clean.mistakes[step]))
        bad = self.find_corruption(problem.meta, clean, step, order)
        if bad is None:
            raise ValueError(f"{self.name}: no mistake at step {step} changes the answer")
        return dataclasses.replace(
            problem,
            steps=bad.steps,
            answer=bad.answer,
            response=self.response(problem.meta, bad),
            first_error_step=step,
        )

    def check_steps(self, problem: Problem, steps: tuple[str, ...]) -> int:
        """Index of the first wrong step of a (sampled) trace, -1 if none; never raises."""
        try:
            return first_mismatch(self.trace(problem.meta).steps, steps)
        except Exception:  # unreadable input is wrong from its first step
            return 0
