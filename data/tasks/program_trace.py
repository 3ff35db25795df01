"""`program_trace`: what does a small generated Python program print?

The prompt is `What does this program print?` followed by the code. The program sets a
few variables, runs a `for` loop over `range(n)` (maybe with an `if` inside), maybe an
`if`/`else`, and prints one variable. Each executed statement is one step, with the
values substituted, and steps inside the loop start with the loop variable:

    a = 3
    s = 0
    i=0: s = s + a = 0 + 3 = 3
    i=0: check i % 2 == 0: 0 % 2 == 0 is True
    i=0: s = s * 2 = 3 * 2 = 6
    ...
    print(s): 14

Programs live in `meta["program"]` as JSON lists, traced by the small interpreter below
(generated code is never `exec`ed here). A program is redrawn unless every step, when
miscomputed, changes what is printed. Knobs: `iterations` (loop length), `max_literal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.answer import parse_int
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

NAMES = ("a", "b", "c", "k", "m", "n", "p", "s", "t", "x", "y", "z")
ARITH = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
BINARY = {**ARITH, "%": lambda x, y: x % y}
COMPARE = {
    ">": lambda x, y: x > y,
    "<": lambda x, y: x < y,
    "==": lambda x, y: x == y,
    "!=": lambda x, y: x != y,
}
SLIPS = (-10, -2, -1, 1, 2, 10)
MAX_VALUE = 100_000
MAX_DRAWS = 200

# A program is a list of statements, each a JSON list:
#   ["set", name, expr]            expr: int | name | [atom, op, atom]
#   ["for", name, n, body]         for name in range(n): body
#   ["if", [expr, cmp, atom], then, else]
#   ["print", name]


def expr_text(expr: Any) -> str:
    """Source text of an expression."""
    return " ".join(str(part) for part in expr) if isinstance(expr, list) else str(expr)


def cond_text(cond: list) -> str:
    """Source text of a condition."""
    return f"{expr_text(cond[0])} {cond[1]} {cond[2]}"


def source(program: list, indent: str = "") -> str:
    """The Python source of a program."""
    lines = []
    for stmt in program:
        if stmt[0] == "set":
            lines.append(f"{indent}{stmt[1]} = {expr_text(stmt[2])}")
        elif stmt[0] == "for":
            lines.append(f"{indent}for {stmt[1]} in range({stmt[2]}):")
            lines.append(source(stmt[3], indent + "    "))
        elif stmt[0] == "if":
            lines.append(f"{indent}if {cond_text(stmt[1])}:")
            lines.append(source(stmt[2], indent + "    "))
            if stmt[3]:
                lines.append(f"{indent}else:")
                lines.append(source(stmt[3], indent + "    "))
        else:
            lines.append(f"{indent}print({stmt[1]})")
    return "\n".join(lines)


def atom_value(atom: Any, env: dict[str, int]) -> int:
    """The value of a literal or a variable."""
    return env[atom] if isinstance(atom, str) else atom


def run(program: list, builder: TraceBuilder) -> tuple[int | None, int]:
    """Executes a program, writing one step per statement; returns (printed, largest |value|)."""
    env: dict[str, int] = {}
    printed, largest = None, 0

    def block(stmts: list, prefix: str) -> None:
        """Executes statements, prefixing their steps (e.g. `i=2: `)."""
        nonlocal printed, largest
        for stmt in stmts:
            if stmt[0] == "for":
                for i in range(stmt[2]):
                    env[stmt[1]] = i
                    block(stmt[3], f"{prefix}{stmt[1]}={i}: ")
            elif stmt[0] == "if":
                block(stmt[2] if check(stmt[1], env, prefix, builder) else stmt[3], prefix)
            elif stmt[0] == "set":
                env[stmt[1]] = assign(stmt[1], stmt[2], env, prefix, builder)
                largest = max(largest, abs(env[stmt[1]]))
            else:
                printed = show(stmt[1], env, prefix, builder)

    block(program, "")
    return printed, largest


def check(cond: list, env: dict, prefix: str, builder: TraceBuilder) -> bool:
    """Writes the step of an `if` test (maybe misjudged); returns the branch taken."""
    lhs, cmp, rhs = cond
    value = COMPARE[cmp](evaluate(lhs, env), atom_value(rhs, env))
    if builder.mistake() == ("flip",):
        value = not value
    shown = f"{substitute(lhs, env)} {cmp} {atom_value(rhs, env)}"
    builder.add(f"{prefix}check {cond_text(cond)}: {shown} is {value}", [("flip",)])
    return value


def show(name: str, env: dict, prefix: str, builder: TraceBuilder) -> int:
    """Writes the step of `print(name)` (maybe miscopied); returns the value printed."""
    mistake = builder.mistake()
    value = env[name] + (mistake[1] if mistake else 0)
    builder.add(f"{prefix}print({name}): {value}", [("value", -1), ("value", 1)])
    return value


def evaluate(expr: Any, env: dict[str, int]) -> int:
    """The value of an expression."""
    if isinstance(expr, list):
        return BINARY[expr[1]](atom_value(expr[0], env), atom_value(expr[2], env))
    return atom_value(expr, env)


def substitute(expr: Any, env: dict[str, int]) -> str:
    """An expression with each variable replaced by its value."""
    if isinstance(expr, list):
        return f"{atom_value(expr[0], env)} {expr[1]} {atom_value(expr[2], env)}"
    return str(atom_value(expr, env))


def assign(name: str, expr: Any, env: dict, prefix: str, builder: TraceBuilder) -> int:
    """Writes the step of `name = expr` (maybe miscomputed); returns the value assigned."""
    value = evaluate(expr, env)
    options: list[Mistake] = [
        ("value", d) for d in (SLIPS if isinstance(expr, list) else (-1, 1, 2))
    ]
    if isinstance(expr, list):
        options += [("op", other) for other in ARITH if other != expr[1]]
    mistake = builder.mistake() or ("none",)
    if mistake[0] == "value":
        value += mistake[1]
    elif mistake[0] == "op":
        value = ARITH[mistake[1]](atom_value(expr[0], env), atom_value(expr[2], env))
    if isinstance(expr, int):
        line = f"{name} = {value}"
    else:
        line = f"{name} = {expr_text(expr)} = {substitute(expr, env)} = {value}"
    builder.add(prefix + line, options)
    return value


def draw_operand(rng: np.random.Generator, names: list[str], max_literal: int) -> Any:
    """A loop-body operand: the loop variable, a variable, or a small literal."""
    choice = int(rng.integers(3))
    if choice == 0:
        return "i"
    if choice == 1:
        return names[int(rng.integers(len(names)))]
    return int(rng.integers(1, max_literal + 1))


def draw_loop_update(
    rng: np.random.Generator, acc: str, names: list[str], max_literal: int, guarded: bool
) -> list:
    """`acc = acc op operand`, multiplying only by a literal 2 or 3 to keep values small."""
    op = ("+", "+", "-", "*")[int(rng.integers(4))]
    operand = int(rng.integers(2, 4)) if op == "*" else draw_operand(rng, names, max_literal)
    if guarded and operand == "i":  # `acc + i` at i=0 changes nothing, so its guard wouldn't matter
        operand = names[0]
    return ["set", acc, [acc, op, operand]]


def names_in(expr: Any) -> set[str]:
    """Variables an expression or condition reads."""
    parts = expr if isinstance(expr, list) else [expr]
    return set().union(*(names_in(p) if isinstance(p, list) else {p} for p in parts)) - set(COMPARE)


def read_names(program: list) -> set[str]:
    """Variables read by some statement other than an update of that same variable."""
    names: set[str] = set()
    for stmt in program:
        if stmt[0] == "set":
            names |= names_in(stmt[2]) - {stmt[1]}
        elif stmt[0] == "for":
            names |= read_names(stmt[3])
        elif stmt[0] == "if":
            names |= names_in(stmt[1]) | read_names(stmt[2]) | read_names(stmt[3])
        else:
            names.add(stmt[1])
    return names


def without_sets(program: list, keep: set[str]) -> list:
    """The program minus assignments to variables outside `keep`."""
    kept = []
    for stmt in program:
        if stmt[0] == "set" and stmt[1] not in keep:
            continue
        if stmt[0] == "for":
            stmt = [*stmt[:3], without_sets(stmt[3], keep)]
        elif stmt[0] == "if":
            stmt = [stmt[0], stmt[1], without_sets(stmt[2], keep), without_sets(stmt[3], keep)]
        kept.append(stmt)
    return kept


def prune(program: list) -> list:
    """Drops assignments nobody reads, until none are left: a dead step can't change output."""
    while True:
        pruned = without_sets(program, read_names(program))
        if pruned == program:
            return program
        program = pruned


def draw_guard(rng: np.random.Generator, iterations: int) -> list:
    """A condition on the loop variable: its parity, or a comparison with a small int."""
    if rng.random() < 0.5:
        return [["i", "%", 2], "==", int(rng.integers(2))]
    return ["i", (">", "<", "!=")[int(rng.integers(3))], int(rng.integers(iterations))]


def draw_program(rng: np.random.Generator, iterations: int, max_literal: int) -> list:
    """A random program: setup, one loop (maybe with an if), maybe an if/else, one print."""
    u, v, acc, w = (str(name) for name in rng.permutation(NAMES)[:4])
    program = [
        ["set", u, int(rng.integers(1, max_literal + 1))],
        ["set", v, int(rng.integers(1, max_literal + 1))],
        ["set", acc, int(rng.integers(0, 3))],
    ]
    names = [u, v]
    if rng.random() < 0.4:
        program.append(["set", w, [u, ("+", "-", "*")[int(rng.integers(3))], v]])
        names.append(w)
    body = [draw_loop_update(rng, acc, names, max_literal, guarded=False)]
    extra = rng.random()
    if extra < 0.5:
        guarded = [draw_loop_update(rng, acc, names, max_literal, guarded=True)]
        body.append(["if", draw_guard(rng, iterations), guarded, []])
    elif extra < 0.75:
        step = "i" if rng.random() < 0.5 else int(rng.integers(1, max_literal + 1))
        body.append(["set", u, [u, "+", step]])
    program.append(["for", "i", iterations, body])
    if rng.random() < 0.6:
        then, orelse = [["set", acc, [acc, "-", v]]], [["set", acc, [acc, "+", u]]]
        program.append(["if", [acc, (">", "<")[int(rng.integers(2))], v], then, orelse])
    program.append(["print", acc])
    return prune(program)


class ProgramTrace(TraceTask):
    """Tracing a small straight-line-and-loop program statement by statement."""

    name = "program_trace"
    summary = "Run each statement in order, writing the values it uses and the value it makes."
    defaults = {"iterations": (2, 4), "max_literal": 9}

    def draw_meta(
        self, rng: np.random.Generator, *, iterations: Any, max_literal: Any, split: str
    ) -> dict:
        """A program whose every step matters for the printed value."""
        bounds = int_range("iterations", iterations, minimum=1)
        max_literal = int_range("max_literal", max_literal, minimum=1)[1]
        for _ in range(MAX_DRAWS):
            meta = {"program": draw_program(rng, draw(rng, bounds), max_literal)}
            if run(meta["program"], TraceBuilder())[1] < MAX_VALUE and self.corruptible(meta):
                return meta
        raise ValueError(f"iterations={iterations!r}: could not draw a program that traces well")

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """One step per executed statement."""
        builder = TraceBuilder(fault)
        printed, _ = run(meta["program"], builder)
        return finish(builder, str(printed))

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`What does this program print?` and the code."""
        return f"What does this program print?\n{source(meta['program'])}"

    def headline(self, meta: Mapping[str, Any]) -> str:
        """A fixed headline: the program itself is in the prompt."""
        return "How to trace the program line by line"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """One sentence with the output, then the answer line."""
        return respond(f"The program prints {trace.answer}.", trace.answer)

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The value is what the program prints."""
        return parse_int(value) == run(meta["program"], TraceBuilder())[0]


PROGRAM_TRACE = ProgramTrace()
