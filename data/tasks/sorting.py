"""`sorting`: `Sort these numbers from smallest to largest: 42, 7, 19, 3.`

Selection sort, one step per number taken: each step takes the smallest of what the
line above left over, then the last step lists the taken numbers in order:

    take 3; left 42, 7, 19
    take 7; left 42, 19
    take 19; left 42
    take 42; left none
    sorted 3, 7, 19, 42

The answer is `3, 7, 19, 42`; the verifier accepts any spacing or brackets. Numbers may
repeat. Knobs: `count` (how many numbers), `max_value` (numbers lie in [0, max_value]).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.answer import parse_int_list
from data.tasks.common import (
    Fault,
    Mistake,
    Trace,
    TraceBuilder,
    TraceTask,
    draw,
    finish,
    int_range,
    respond,
)


def joined(values: list[int]) -> str:
    """Numbers as `3, 7, 19`, or `none` when there are none."""
    return ", ".join(str(v) for v in values) if values else "none"


def take_mistakes(left: list[int], smallest: int, rest: list[int]) -> list[Mistake]:
    """Slips in one take step: not the smallest, a miscopied number, a dropped number."""
    options: list[Mistake] = [("not_min", v) for v in sorted(set(left)) if v > smallest]
    options += [("miscopy_take", smallest + d) for d in (-1, 1) if smallest + d >= 0]
    options += [("drop_left", i) for i in range(len(rest))]
    options += [
        ("miscopy_left", i, d) for i in range(len(rest)) for d in (-1, 1) if rest[i] + d >= 0
    ]
    return options


def list_mistakes(values: list[int]) -> list[Mistake]:
    """Slips in copying the final list: two neighbours swapped, one dropped or miscopied."""
    options: list[Mistake] = [
        ("swap", i) for i in range(len(values) - 1) if values[i] != values[i + 1]
    ]
    options += [("drop", i) for i in range(len(values))]
    options += [
        ("miscopy", i, d) for i in range(len(values)) for d in (-1, 1) if values[i] + d >= 0
    ]
    return options


class Sorting(TraceTask):
    """Sorting a few ints by repeatedly taking the smallest."""

    name = "sorting"
    summary = "Take the smallest remaining number each time, then list them in the order taken."
    defaults = {"count": (3, 6), "max_value": 99}

    def draw_meta(
        self, rng: np.random.Generator, *, count: Any, max_value: Any, split: str
    ) -> dict:
        """`count` uniform ints in [0, max_value]."""
        bounds = int_range("count", count, minimum=2)
        max_value = int_range("max_value", max_value, minimum=1)[1]
        n = draw(rng, bounds)
        return {"values": [int(v) for v in rng.integers(0, max_value + 1, size=n)]}

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """One take step per number, then the sorted list."""
        left = list(meta["values"])
        builder = TraceBuilder(fault)
        taken = []
        while left:
            smallest = min(left)
            rest = list(left)
            rest.remove(smallest)
            options = take_mistakes(left, smallest, rest)
            mistake = builder.mistake() or ("none",)
            take = smallest
            if mistake[0] == "not_min":
                take = mistake[1]
                rest = list(left)
                rest.remove(take)
            elif mistake[0] == "miscopy_take":
                take = mistake[1]
            elif mistake[0] == "drop_left":
                del rest[mistake[1]]
            elif mistake[0] == "miscopy_left":
                rest[mistake[1]] += mistake[2]
            builder.add(f"take {take}; left {joined(rest)}", options)
            taken.append(take)
            left = rest
        options = list_mistakes(taken)
        mistake = builder.mistake() or ("none",)
        if mistake[0] == "swap":
            i = mistake[1]
            taken[i], taken[i + 1] = taken[i + 1], taken[i]
        elif mistake[0] == "drop":
            del taken[mistake[1]]
        elif mistake[0] == "miscopy":
            taken[mistake[1]] += mistake[2]
        builder.add(f"sorted {joined(taken)}", options)
        return finish(builder, ", ".join(str(v) for v in taken))

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`Sort these numbers from smallest to largest: 42, 7, 19, 3.`."""
        return f"Sort these numbers from smallest to largest: {joined(meta['values'])}."

    def headline(self, meta: Mapping[str, Any]) -> str:
        """`How to sort 4 numbers by taking the smallest each time`."""
        return f"How to sort {len(meta['values'])} numbers by taking the smallest each time"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """One sentence with the sorted list, then the answer line."""
        return respond(f"From smallest to largest: {trace.answer}.", trace.answer)

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The value lists the same numbers in ascending order."""
        return parse_int_list(value) == sorted(meta["values"])


SORTING = Sorting()
