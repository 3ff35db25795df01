"""The verifiable task suite: a registry of task families and a seeded problem mixer.

Families (registry keys): `addition`, `multiplication`, `letter_count`, `arithmetic`,
`sorting`, `program_trace`, `program_write`. Each one generates `Problem`s with a full
step trace, verifies responses through their `Answer:` line, corrupts traces at a chosen
step (for process reward labels) and checks sampled steps against the truth.

There is no separate answer-only family: the answer-only format is the same problem with
its thinking block dropped, which the format module does when rendering a dialogue.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.addition import ADDITION
from data.tasks.arithmetic import ARITHMETIC
from data.tasks.base import Problem, TaskFamily
from data.tasks.common import check_split
from data.tasks.letter_count import LETTER_COUNT
from data.tasks.multiplication import MULTIPLICATION
from data.tasks.program_trace import PROGRAM_TRACE
from data.tasks.program_write import PROGRAM_WRITE
from data.tasks.sorting import SORTING

TASKS: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        ADDITION,
        MULTIPLICATION,
        LETTER_COUNT,
        ARITHMETIC,
        SORTING,
        PROGRAM_TRACE,
        PROGRAM_WRITE,
    )
}


def get_task(name: str) -> TaskFamily:
    """The task family registered as `name`."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def verify(problem: Problem, response: str) -> float:
    """Scores `response` to `problem` with its family's verifier (GSM8K records included)."""
    if problem.task == "gsm8k":
        from data.gsm8k import verify_gsm8k  # data.gsm8k imports this package

        return verify_gsm8k(problem, response)
    return get_task(problem.task).verify(problem, response)


def task_counts(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Exact counts summing to `n`, proportional to `weights` (largest remainder method).

    Each task gets floor(n * w / sum(w)); the few problems left go one each to the tasks
    with the largest fractional parts, ties broken by task name.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for name, weight in weights.items():
        if not isinstance(weight, int | float) or weight < 0 or weight != weight:
            raise ValueError(f"task {name!r}: weight must be a number >= 0, got {weight!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"task weights must not all be 0: {dict(weights)}")
    quotas = {name: n * weight / total for name, weight in weights.items()}
    counts = {name: int(quota) for name, quota in quotas.items()}
    by_remainder = sorted(quotas, key=lambda name: (counts[name] - quotas[name], name))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def generate_problems(
    task_mix: Mapping[str, Mapping[str, Any]], n: int, seed: int, split: str
) -> list[Problem]:
    """`n` problems mixed as `task_mix` says ({name: {"weight": w, "knobs": {...}}}), shuffled.

    Each task draws from its own generator, seeded by (seed, task name, split), so adding a
    task to the mix does not change the problems of the others, and splits never share a
    random stream.
    """
    check_split(split)
    for name, entry in task_mix.items():
        get_task(name)
        unknown = sorted(set(entry) - {"weight", "knobs"})
        if "weight" not in entry or unknown:
            raise ValueError(
                f"task {name!r}: entry needs 'weight' and optional 'knobs', got {entry}"
            )
        if "split" in entry.get("knobs", {}):
            raise ValueError(f"task {name!r}: set the split with generate_problems(split=...)")
    counts = task_counts({name: entry["weight"] for name, entry in task_mix.items()}, n)
    problems = []
    for name in sorted(task_mix):
        family, knobs = TASKS[name], dict(task_mix[name].get("knobs", {}))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])
        problems += [family.generate(rng, split=split, **knobs) for _ in range(counts[name])]
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(problems))
    return [problems[i] for i in order]
