"""`addition`: `What is 4821 + 937?`, added column by column with carries.

Steps, one per column from the right, then the assembled result:

    1+7+0=8
    2+3+0=5
    8+9+0=17
    4+0+1=5
    4821+937=5758

Each sum's last digit is written and its tens digit carried into the next line.

Knobs: `digits`, the digit count of each operand (an int, or a (min, max) range drawn
independently for each operand).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.answer import parse_int
from data.tasks.columns import add_columns
from data.tasks.common import (
    Fault,
    Trace,
    TraceBuilder,
    TraceTask,
    apply_number_mistake,
    draw,
    finish,
    int_range,
    number_mistakes,
    respond,
)


def draw_number(rng: np.random.Generator, n_digits: int) -> int:
    """A uniform int with exactly `n_digits` digits (0 included when one digit)."""
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return int(rng.integers(low, 10**n_digits))


class Addition(TraceTask):
    """Multi-digit addition, one column per step."""

    name = "addition"
    summary = "Add the columns with carries."
    defaults = {"digits": (1, 4)}

    def draw_meta(self, rng: np.random.Generator, *, digits: Any, split: str) -> dict:
        """Two operands whose digit counts are drawn from `digits`."""
        bounds = int_range("digits", digits, minimum=1)
        return {"a": draw_number(rng, draw(rng, bounds)), "b": draw_number(rng, draw(rng, bounds))}

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """Column steps for `a + b`, then the line that assembles the result."""
        a, b = meta["a"], meta["b"]
        builder = TraceBuilder(fault)
        total = add_columns(builder, a, b)
        mistake = builder.mistake()
        options = number_mistakes(total)
        if mistake is not None:
            total = apply_number_mistake(total, mistake)
        builder.add(f"{a}+{b}={total}", options)
        return finish(builder, str(total))

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`What is A + B?`."""
        return f"What is {meta['a']} + {meta['b']}?"

    def headline(self, meta: Mapping[str, Any]) -> str:
        """`How to add A and B`."""
        return f"How to add {meta['a']} and {meta['b']}"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """One sentence with the sum, then the answer line."""
        sentence = f"{meta['a']} + {meta['b']} = {trace.answer}."
        return respond(sentence, trace.answer)

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The value is the sum, written as an int."""
        return parse_int(value) == meta["a"] + meta["b"]


ADDITION = Addition()
