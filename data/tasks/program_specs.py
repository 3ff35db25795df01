"""The bank of small functions `program_write` asks for, each with its realistic bugs.

Every spec has the same shape, a loop over an accumulator, so that one plan fits all:

    def count_greater(xs):         plan: count the numbers in xs greater than 7
        count = 0                        start with count = 0
        for x in xs:                     go through each x in xs
            if x > 7:                    if x > 7, add 1 to count
                count += 1
        return count                     return count

Each plan step has its own realistic bug: a misread constant, a wrong start value, an
off-by-one loop (`xs[1:]`, `range(1, n)`), a wrong comparison or update, a `return`
inside the loop. The hidden inputs of each spec include the edge cases that expose them.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable
from typing import Any

import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A loop-shaped function to write: its text, plan, code pieces, bugs and hidden inputs."""

    name: str
    arg: str
    does: str  # completes "returns ..."; formatted with the params
    plan: str  # the first plan step, restating the task
    acc: str
    init: str
    wrong_init: str
    item: str
    iterable: str
    wrong_iterable: str  # the off-by-one loop
    cond: str | None
    wrong_cond: str | None
    update: str  # code of the update
    update_text: str  # the update as a plan step
    wrong_update: tuple[str, str] | None  # (code, text)
    draw_params: Callable[[np.random.Generator], Params]
    misreads: Callable[[Params], list[Params]]  # params as a careless reader takes them
    reference: Callable[..., Any]  # (params, *args) -> the right return value
    draw_inputs: Callable[[np.random.Generator, Params], list[tuple]]


def near(key: str, low: int, high: int) -> Callable[[Params], list[Params]]:
    """Misreads of an int param: one less or one more, kept within [low, high]."""
    return lambda p: [{**p, key: p[key] + d} for d in (-1, 1) if low <= p[key] + d <= high]


def random_list(rng: np.random.Generator, low: int, high: int) -> list[int]:
    """A list of 3 to 8 ints in [low, high]."""
    return [int(v) for v in rng.integers(low, high + 1, size=int(rng.integers(3, 9)))]


def neighbours(letter: str) -> list[str]:
    """The letters next to `letter` in the alphabet."""
    i = string.ascii_lowercase.index(letter)
    return [string.ascii_lowercase[j] for j in (i - 1, i + 1) if 0 <= j < 26]


def draw_strings(rng: np.random.Generator, p: Params) -> list[tuple]:
    """Strings with a known count of the letter and different counts of its neighbours."""
    c, near_letters = p["c"], neighbours(p["c"])
    mixed = c * 3 + "".join(letter * (i + 1) for i, letter in enumerate(near_letters))
    alphabet = [c, *near_letters, "x"]
    shuffled = "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=8))
    return [("",), (c + "x" + c + c,), ("x" + c,), (mixed,), (shuffled,)]


def draw_bounds(rng: np.random.Generator) -> Params:
    """An inclusive range [lo, hi] with lo >= 1, so that a sum of it exceeds its count."""
    lo = int(rng.integers(1, 11))
    return {"lo": lo, "hi": lo + int(rng.integers(2, 9))}


SPECS = (
    Spec(
        name="sum_divisible",
        arg="xs",
        does="the sum of the numbers in xs that are divisible by {k}",
        plan="add up the numbers in xs divisible by {k}",
        acc="total",
        init="0",
        wrong_init="1",
        item="x",
        iterable="xs",
        wrong_iterable="xs[1:]",
        cond="x % {k} == 0",
        wrong_cond="x % {k} != 0",
        update="total += x",
        update_text="add x to total",
        wrong_update=("total += 1", "add 1 to total"),
        draw_params=lambda rng: {"k": int(rng.integers(2, 6))},
        misreads=near("k", 2, 9),
        reference=lambda p, xs: sum(x for x in xs if x % p["k"] == 0),
        draw_inputs=lambda rng, p: [
            ([],),
            (list(range(1, 13)),),
            ([p["k"], 1],),
            ([1, 3 * p["k"]],),
            (random_list(rng, 0, 30),),
        ],
    ),
    Spec(
        name="count_greater",
        arg="xs",
        does="how many numbers in xs are greater than {t}",
        plan="count the numbers in xs greater than {t}",
        acc="count",
        init="0",
        wrong_init="1",
        item="x",
        iterable="xs",
        wrong_iterable="xs[1:]",
        cond="x > {t}",
        wrong_cond="x >= {t}",
        update="count += 1",
        update_text="add 1 to count",
        wrong_update=("count += x", "add x to count"),
        draw_params=lambda rng: {"t": int(rng.integers(0, 21))},
        misreads=near("t", 0, 30),
        reference=lambda p, xs: sum(x > p["t"] for x in xs),
        draw_inputs=lambda rng, p: [
            ([],),
            (list(range(p["t"] - 3, p["t"] + 4)),),
            ([p["t"] + 1, p["t"]],),
            ([p["t"] - 1, p["t"] + 1, p["t"] + 2],),
            (random_list(rng, 0, 30),),
        ],
    ),
    Spec(
        name="count_char",
        arg="s",
        does="how many times the character '{c}' appears in the string s",
        plan="count the characters of s equal to '{c}'",
        acc="count",
        init="0",
        wrong_init="1",
        item="ch",
        iterable="s",
        wrong_iterable="s[1:]",
        cond="ch == '{c}'",
        wrong_cond="ch != '{c}'",
        update="count += 1",
        update_text="add 1 to count",
        wrong_update=("count = 1", "set count to 1"),
        draw_params=lambda rng: {"c": string.ascii_lowercase[int(rng.integers(26))]},
        misreads=lambda p: [{"c": letter} for letter in neighbours(p["c"])],
        reference=lambda p, s: s.count(p["c"]),
        draw_inputs=draw_strings,
    ),
    Spec(
        name="largest_below",
        arg="xs",
        does="the largest number in xs that is less than {t}, or None if there is none",
        plan="find the largest number in xs below {t}",
        acc="best",
        init="None",
        wrong_init="0",
        item="x",
        iterable="xs",
        wrong_iterable="xs[1:]",
        cond="x < {t} and (best is None or x > best)",
        wrong_cond="x <= {t} and (best is None or x > best)",
        update="best = x",
        update_text="set best to x",
        wrong_update=None,
        draw_params=lambda rng: {"t": int(rng.integers(5, 31))},
        misreads=near("t", 1, 40),
        reference=lambda p, xs: max((x for x in xs if x < p["t"]), default=None),
        draw_inputs=lambda rng, p: [
            ([],),
            ([-3, -7],),
            ([p["t"] - 5, p["t"] - 1],),
            ([p["t"], p["t"] - 2],),
            ([p["t"] - 1, p["t"] - 3],),
            (random_list(rng, 0, 40),),
        ],
    ),
    Spec(
        name="scale_all",
        arg="xs",
        does="a new list with every number in xs multiplied by {k}",
        plan="multiply each number in xs by {k}",
        acc="out",
        init="[]",
        wrong_init="list(xs)",
        item="x",
        iterable="xs",
        wrong_iterable="xs[1:]",
        cond=None,
        wrong_cond=None,
        update="out.append(x * {k})",
        update_text="append x * {k} to out",
        wrong_update=("out.append(x + {k})", "append x + {k} to out"),
        draw_params=lambda rng: {"k": int(rng.integers(2, 6))},
        misreads=near("k", 2, 9),
        reference=lambda p, xs: [x * p["k"] for x in xs],
        draw_inputs=lambda rng, p: [([],), ([3, 1, 4],), (random_list(rng, -9, 20),)],
    ),
    Spec(
        name="sum_powers",
        arg="n",
        does="the sum of i ** {p} for every integer i from 1 to n (0 when n is less than 1)",
        plan="add up i ** {p} for i from 1 to n",
        acc="total",
        init="0",
        wrong_init="1",
        item="i",
        iterable="range(1, n + 1)",
        wrong_iterable="range(1, n)",
        cond=None,
        wrong_cond=None,
        update="total += i ** {p}",
        update_text="add i ** {p} to total",
        wrong_update=("total += i * {p}", "add i * {p} to total"),
        draw_params=lambda rng: {"p": int(rng.integers(2, 4))},
        misreads=near("p", 1, 4),
        reference=lambda p, n: sum(i ** p["p"] for i in range(1, n + 1)),
        draw_inputs=lambda rng, p: [(0,), (1,), (3,), (int(rng.integers(4, 11)),)],
    ),
    Spec(
        name="first_index_above",
        arg="xs",
        does="the index of the first number in xs that is greater than {t}, or -1 if there is none",
        plan="find the first index i with xs[i] > {t}",
        acc="index",
        init="-1",
        wrong_init="0",
        item="i",
        iterable="range(len(xs))",
        wrong_iterable="range(1, len(xs))",
        cond="xs[i] > {t} and index == -1",
        wrong_cond="xs[i] >= {t} and index == -1",
        update="index = i",
        update_text="set index to i",
        wrong_update=("index = i + 1", "set index to i + 1"),
        draw_params=lambda rng: {"t": int(rng.integers(0, 21))},
        misreads=near("t", 0, 30),
        reference=lambda p, xs: next((i for i, x in enumerate(xs) if x > p["t"]), -1),
        draw_inputs=lambda rng, p: [
            ([],),
            ([p["t"] + 1, p["t"] + 5],),
            ([p["t"] - 1, p["t"], p["t"] + 1],),
            ([p["t"] - 2, p["t"] - 1],),
            (random_list(rng, 0, 30),),
        ],
    ),
    Spec(
        name="count_between",
        arg="xs",
        does="how many numbers in xs are between {lo} and {hi}, both included",
        plan="count the numbers x in xs with {lo} <= x <= {hi}",
        acc="count",
        init="0",
        wrong_init="1",
        item="x",
        iterable="xs",
        wrong_iterable="xs[1:]",
        cond="{lo} <= x <= {hi}",
        wrong_cond="{lo} < x < {hi}",
        update="count += 1",
        update_text="add 1 to count",
        wrong_update=("count += x", "add x to count"),
        draw_params=draw_bounds,
        misreads=lambda p: near("lo", 0, p["hi"] - 1)(p) + near("hi", p["lo"] + 1, 30)(p),
        reference=lambda p, xs: sum(p["lo"] <= x <= p["hi"] for x in xs),
        draw_inputs=lambda rng, p: [
            ([],),
            (list(range(p["lo"] - 2, p["hi"] + 3)),),
            ([p["lo"], p["hi"]],),
            ([p["lo"] - 1, p["lo"]],),
            (random_list(rng, 0, 25),),
        ],
    ),
)
SPECS_BY_NAME = {spec.name: spec for spec in SPECS}
