"""`arithmetic`: `What is (7 + 5) * 3 - 4?`, reduced one operation per step.

Each step performs one reduction and rewrites the whole expression:

    7 + 5 = 12, so 12 * 3 - 4
    12 * 3 = 36, so 36 - 4
    36 - 4 = 32, so 32

The next reduction is the innermost one: deepest inside parentheses first, then `*`
before `+`/`-`, then leftmost. Operands are ints in [1, max_operand]; there is no
division, and intermediate results (and answers) may be negative, written `(-2)` inside
an expression. Expressions where a product has a zero factor are redrawn, so that every
slip changes the answer. Knobs: `ops` (number of operators), `max_operand`.
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

OPS = ("+", "-", "*")
PREC = {"+": 1, "-": 1, "*": 2}
SLIPS = (-10, -2, -1, 1, 2, 10)
MAX_DRAWS = 1000

Node = Any  # an int, or [op, left, right]
Token = int | str  # an int literal, an operator, "(" or ")"


def apply_op(op: str, left: int, right: int) -> int:
    """The value of `left op right`."""
    return left + right if op == "+" else left - right if op == "-" else left * right


def evaluate(node: Node) -> int:
    """The value of an expression tree."""
    if isinstance(node, int):
        return node
    return apply_op(node[0], evaluate(node[1]), evaluate(node[2]))


def needs_parens(node: Node, parent_prec: int, is_right: bool) -> bool:
    """Whether `node` must be bracketed under its parent for the text to parse back to it."""
    if isinstance(node, int):
        return False
    prec = PREC[node[0]]
    return prec < parent_prec or (is_right and prec == parent_prec)


def tokens_of(node: Node, parent_prec: int = 0, is_right: bool = False) -> list[Token]:
    """The tokens of an expression with as few parentheses as its structure needs."""
    if isinstance(node, int):
        return [node]
    op, left, right = node
    inner = [*tokens_of(left, PREC[op]), op, *tokens_of(right, PREC[op], True)]
    return ["(", *inner, ")"] if needs_parens(node, parent_prec, is_right) else inner


def literal(value: int) -> str:
    """An int as written inside an expression: negatives in parentheses."""
    return str(value) if value >= 0 else f"({value})"


def render(node: Node) -> str:
    """An expression as text, e.g. `(7 + 5) * 3 - 4`; a lone int is written plainly."""
    if isinstance(node, int):
        return str(node)
    text = " ".join(literal(t) if isinstance(t, int) else t for t in tokens_of(node))
    return text.replace("( ", "(").replace(" )", ")")


def parse(tokens: list[Token]) -> Node:
    """The tree of a token list, with the usual precedence and left associativity."""
    position = 0

    def atom() -> Node:
        """A number or a bracketed expression."""
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            node = expression()
            position += 1  # the closing ")"
            return node
        return token

    def binary(operand, ops: tuple[str, ...]) -> Node:
        """A left-associative chain of `operand`s joined by `ops`."""
        nonlocal position
        node = operand()
        while position < len(tokens) and tokens[position] in ops:
            op = tokens[position]
            position += 1
            node = [op, node, operand()]
        return node

    def expression() -> Node:
        """Sums of products."""
        return binary(lambda: binary(atom, ("*",)), ("+", "-"))

    return expression()


def next_reduction(node: Node) -> tuple[int, ...]:
    """Path (child indices 1/2) to the innermost, highest-precedence, leftmost ready node."""
    ready: list[tuple[tuple[int, int, int], tuple[int, ...]]] = []

    def visit(sub: Node, path: tuple[int, ...], depth: int, parent_prec: int, right: bool):
        """Collects ready nodes in text order with their bracket depth."""
        if isinstance(sub, int):
            return
        depth += needs_parens(sub, parent_prec, right)
        visit(sub[1], (*path, 1), depth, PREC[sub[0]], False)
        if isinstance(sub[1], int) and isinstance(sub[2], int):
            ready.append(((depth, PREC[sub[0]], -len(ready)), path))
        visit(sub[2], (*path, 2), depth, PREC[sub[0]], True)

    visit(node, (), 0, 0, False)
    return max(ready)[1]


def replace(node: Node, path: tuple[int, ...], value: Node) -> Node:
    """A copy of `node` with the subtree at `path` replaced by `value`."""
    if not path:
        return value
    copy = list(node)
    copy[path[0]] = replace(node[path[0]], path[1:], value)
    return copy


def subtree(node: Node, path: tuple[int, ...]) -> Node:
    """The subtree at `path`."""
    for index in path:
        node = node[index]
    return node


def out_of_order(node: Node, correct: Node) -> dict[int, Node]:
    """Trees from reducing another adjacent `a op b` pair first, keyed by its token index."""
    tokens = tokens_of(node)
    wrong = {}
    for i in range(len(tokens) - 2):
        a, op, b = tokens[i : i + 3]
        if not (isinstance(a, int) and op in PREC and isinstance(b, int)):
            continue
        before, after = tokens[:i], tokens[i + 3 :]
        if before[-1:] == ["("] and after[:1] == [")"]:
            before, after = before[:-1], after[1:]
        reduced = parse([*before, apply_op(op, a, b), *after])
        if tokens_of(reduced) != tokens_of(correct):
            wrong[i] = reduced
    return wrong


def draw_tree(rng: np.random.Generator, n_ops: int, max_operand: int) -> Node:
    """A random expression tree with `n_ops` operators."""
    if n_ops == 0:
        return int(rng.integers(1, max_operand + 1))
    n_left = int(rng.integers(0, n_ops))
    op = OPS[int(rng.integers(len(OPS)))]
    return [
        op,
        draw_tree(rng, n_left, max_operand),
        draw_tree(rng, n_ops - 1 - n_left, max_operand),
    ]


def has_zero_factor(node: Node) -> bool:
    """Whether some product has a factor worth 0, which would hide a slip below it."""
    if isinstance(node, int):
        return False
    zero = node[0] == "*" and 0 in (evaluate(node[1]), evaluate(node[2]))
    return zero or has_zero_factor(node[1]) or has_zero_factor(node[2])


class Arithmetic(TraceTask):
    """Integer expressions with + - * and parentheses, one reduction per step."""

    name = "arithmetic"
    summary = "Reduce parentheses first, then products, then sums left to right, one at a time."
    defaults = {"ops": (2, 4), "max_operand": 9}

    def draw_meta(
        self, rng: np.random.Generator, *, ops: Any, max_operand: Any, split: str
    ) -> dict:
        """An expression tree with a number of operators drawn from `ops`."""
        bounds = int_range("ops", ops, minimum=1)
        max_operand = int_range("max_operand", max_operand, minimum=1)[1]
        for _ in range(MAX_DRAWS):
            tree = draw_tree(rng, draw(rng, bounds), max_operand)
            if not has_zero_factor(tree):
                return {"expression": tree}
        raise ValueError(
            f"max_operand={max_operand}: could not draw an expression without 0 factors"
        )

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """One reduction per step until a single number is left."""
        node = meta["expression"]
        builder = TraceBuilder(fault)
        while not isinstance(node, int):
            path = next_reduction(node)
            op, left, right = subtree(node, path)
            value = apply_op(op, left, right)
            correct = replace(node, path, value)
            wrong_orders = out_of_order(node, correct)
            options: list[Mistake] = [("slip", slip) for slip in SLIPS]
            options += [("op", other) for other in OPS if other != op]
            options += [("sign",)] if op == "-" and value != 0 else []
            options += [("order", index) for index in wrong_orders]
            mistake = builder.mistake() or ("none",)
            if mistake[0] == "order":
                reduced = wrong_orders[mistake[1]]
                left, op, right = tokens_of(node)[mistake[1] : mistake[1] + 3]
                value = apply_op(op, left, right)
            else:
                if mistake[0] == "slip":
                    value += mistake[1]
                elif mistake[0] == "op":
                    value = apply_op(mistake[1], left, right)
                elif mistake[0] == "sign":
                    value = -value
                reduced = replace(node, path, value)
            step = f"{literal(left)} {op} {literal(right)} = {value}, so {render(reduced)}"
            builder.add(step, options)
            node = reduced
        return finish(builder, str(node))

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`What is (7 + 5) * 3 - 4?`."""
        return f"What is {render(meta['expression'])}?"

    def headline(self, meta: Mapping[str, Any]) -> str:
        """`How to evaluate (7 + 5) * 3 - 4 step by step`."""
        return f"How to evaluate {render(meta['expression'])} step by step"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """One sentence with the value, then the answer line."""
        sentence = f"Evaluating step by step, {render(meta['expression'])} = {trace.answer}."
        return respond(sentence, trace.answer)

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The value is the expression's value."""
        return parse_int(value) == evaluate(meta["expression"])


ARITHMETIC = Arithmetic()
