"""Column-by-column addition with carries, one step per column; used by + and *.

A column step reads `x+y+c=s`: both digits, the carry coming in and their sum. The sum's
last digit is the digit written and its tens digit the carry going out, so each line
depends only on two digits of the operands and on the sum at the end of the line above,
which keeps the steps local. Spelling out `, write d, carry k` as well doubled a column's
tokens and taught nothing a small model did not read off the sum.
"""

from __future__ import annotations

from data.tasks.common import Mistake, TraceBuilder

SLIPS = (-2, -1, 1, 2)  # how far off a mis-added digit sum is


def digits_of(value: int) -> list[int]:
    """Decimal digits of a non-negative int, least significant first."""
    return [int(char) for char in reversed(str(value))]


def assemble(written: list[int], carry: int) -> int:
    """The number whose digits (least significant first) were written, led by the last carry."""
    return sum(digit * 10**i for i, digit in enumerate(written)) + carry * 10 ** len(written)


def column_mistakes(x: int, y: int, carry_in: int) -> list[Mistake]:
    """Realistic slips in one column: a wrong sum, a dropped carry, a misread digit.

    A carry forgotten on the way out would leave this line unchanged and show only in the
    next one, which reads as a carry dropped there: that is the slip the next column admits.
    """
    total = x + y + carry_in
    options: list[Mistake] = [("sum", slip) for slip in SLIPS if total + slip >= 0]
    if carry_in:
        options.append(("carry_dropped",))
    for which, digit in (("misread_top", x), ("misread_bottom", y)):
        options += [(which, new) for new in (digit - 1, digit + 1) if 0 <= new <= 9]
    return options


def add_columns(builder: TraceBuilder, top: int, bottom: int) -> int:
    """Writes one step per column of `top + bottom`, right to left; returns the written sum."""
    tops, bottoms = digits_of(top), digits_of(bottom)
    carry, written = 0, []
    for i in range(max(len(tops), len(bottoms))):
        x = tops[i] if i < len(tops) else 0
        y = bottoms[i] if i < len(bottoms) else 0
        carry_in = carry
        options = column_mistakes(x, y, carry_in)
        mistake = builder.mistake() or ("none",)
        if mistake[0] == "misread_top":
            x = mistake[1]
        elif mistake[0] == "misread_bottom":
            y = mistake[1]
        elif mistake[0] == "carry_dropped":
            carry_in = 0
        total = x + y + carry_in + (mistake[1] if mistake[0] == "sum" else 0)
        carry = total // 10
        builder.add(f"{x}+{y}+{carry_in}={total}", options)
        written.append(total % 10)
    return assemble(written, carry)
