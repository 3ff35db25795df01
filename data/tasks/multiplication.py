"""`multiplication`: `What is 482 * 37?`, long multiplication with one digit per step.

For each digit of B from the right: one step per digit of A with its carry, then the
partial product, shifted. Each new partial product is added to the running total right
away, column by column, so the numbers a step needs are always a few lines above it:

    2*7+0=14+0=14
    8*7+1=56+1=57
    4*7+5=28+5=33
    482*7=3374
    2*3+0=6+0=6
    8*3+0=24+0=24
    4*3+2=12+2=14
    482*30=14460
    4+0+0=4
    ...
    3374+14460=17834

Per-digit steps with explicit carries were learned about 5x faster by a small model than
one-line partial products (NOTES.md, "Step formats"). A step's last digit is the digit
written and the rest the carry into the next step, as in the column sums of `columns.py`.
The product and the carry are added in a second equality, so the model memorizes the 100
single-digit products rather than 900 (product, carry) sums: writing `8*7+1=57` in one go,
35 of the SFT model's 36 wrong answers on 40 held-out problems first went wrong at a digit
step, carry 0 or not (`9*8+0=81`), and it scored 14%; with the second equality, 61-65%.
Knobs: `digits_a`, `digits_b`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.addition import draw_number
from data.tasks.answer import parse_int
from data.tasks.columns import add_columns, assemble, digits_of
from data.tasks.common import (
    Fault,
    Mistake,
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

PRODUCT_SLIPS = (-10, -2, -1, 1, 2, 10)  # times-table slips, including a misplaced ten
ADD_SLIPS = (-1, 1)  # adding the carry to the product


def multiply_row(builder: TraceBuilder, a: int, digit: int) -> int:
    """Writes one step per digit of `a` times `digit`; returns the written product."""
    carry, written = 0, []
    for x in digits_of(a):
        carry_in = carry
        options: list[Mistake] = [("prod", s) for s in PRODUCT_SLIPS if x * digit + s >= 0]
        if carry_in:  # a forgotten carry reads as the next step dropping it
            options += [("carry_dropped",)] + [("add", s) for s in ADD_SLIPS]
        mistake = builder.mistake() or ("none",)
        if mistake[0] == "carry_dropped":
            carry_in = 0
        times = x * digit + (mistake[1] if mistake[0] == "prod" else 0)
        product = times + carry_in + (mistake[1] if mistake[0] == "add" else 0)
        carry = product // 10
        builder.add(f"{x}*{digit}+{carry_in}={times}+{carry_in}={product}", options)
        written.append(product % 10)
    return assemble(written, carry)


def write_number(builder: TraceBuilder, template: str, value: int, extra: list[Mistake]) -> int:
    """Writes `template` filled with `value`, maybe miscopied; returns the value shown."""
    options = number_mistakes(value) + extra
    mistake = builder.mistake()
    if mistake is not None and mistake[0] != "no_shift":
        value = apply_number_mistake(value, mistake)
    builder.add(template.format(value), options)
    return value


class Multiplication(TraceTask):
    """Long multiplication: per-digit products with carries, partial products summed."""

    name = "multiplication"
    summary = "Multiply digit by digit, then add the rows."
    defaults = {"digits_a": 3, "digits_b": 2}

    def draw_meta(
        self, rng: np.random.Generator, *, digits_a: Any, digits_b: Any, split: str
    ) -> dict:
        """Two operands with digit counts drawn from `digits_a` and `digits_b`."""
        bounds_a = int_range("digits_a", digits_a, minimum=1)
        bounds_b = int_range("digits_b", digits_b, minimum=1)
        return {
            "a": draw_number(rng, draw(rng, bounds_a)),
            "b": draw_number(rng, draw(rng, bounds_b)),
        }

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """Per-digit rows, each shifted partial product, and a running column sum."""
        a, b = meta["a"], meta["b"]
        builder = TraceBuilder(fault)
        total = 0
        for shift, digit in enumerate(digits_of(b)):
            row = multiply_row(builder, a, digit)
            multiplier = digit * 10**shift
            can_forget_shift = shift > 0 and row > 0
            forgot_shift = can_forget_shift and builder.mistake() == ("no_shift",)
            partial = row if forgot_shift else row * 10**shift
            extra = [("no_shift",)] if can_forget_shift else []
            partial = write_number(builder, f"{a}*{multiplier}={{}}", partial, extra)
            if shift == 0:
                total = partial
                continue
            written = add_columns(builder, total, partial)
            total = write_number(builder, f"{total}+{partial}={{}}", written, [])
        return finish(builder, str(total))

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`What is A * B?`."""
        return f"What is {meta['a']} * {meta['b']}?"

    def headline(self, meta: Mapping[str, Any]) -> str:
        """`How to multiply A by B`."""
        return f"How to multiply {meta['a']} by {meta['b']}"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """One sentence with the product, then the answer line."""
        sentence = f"{meta['a']} * {meta['b']} = {trace.answer}."
        return respond(sentence, trace.answer)

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The value is the product, written as an int."""
        return parse_int(value) == meta["a"] * meta["b"]


MULTIPLICATION = Multiplication()
