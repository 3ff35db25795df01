"""`program_write`: write a small Python function that passes hidden tests.

The prompt is `Write a Python function `count_greater(xs)` that returns how many numbers
in xs are greater than 7.` (specs in `program_specs.py`). The steps are the plan, one line
per piece of code; the response holds the code in a ```python block and ends with
`Answer: <function name>`.

`verify` needs both: the `Answer:` line must name the function, and the last ```python
(or bare ```) block must pass every hidden test (stored in `meta["tests"]` as
`[call expression, expected value]`) inside the sandbox. `corrupt` puts a realistic bug
into one plan step and the code it maps to; the answer line still names the function,
but the code fails a hidden test, so verify scores the corrupted response 0.
Knobs: `spec` (a spec name, or None for any).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.answer import extract_answer
from data.tasks.base import Problem
from data.tasks.common import Fault, Trace, TraceBuilder, TraceTask, finish
from data.tasks.program_specs import SPECS, SPECS_BY_NAME, Spec
from data.tasks.sandbox import run_python

_CODE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
MAX_RESPONSE_CHARS = 100_000


def extract_code(text: str) -> str | None:
    """The body of the last fenced code block in `text`, or None."""
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    blocks = _CODE_RE.findall(text)
    return blocks[-1] if blocks else None


def function_name(value: str) -> str:
    """The bare name in an answer such as `count_greater`, count_greater(xs) or count_greater."""
    return value.strip().strip("`").split("(")[0].strip()


def write_plan(spec: Spec, params: Mapping[str, Any], builder: TraceBuilder) -> str:
    """Writes the plan steps (a bug at the faulted step) and returns the matching code."""
    misreads = spec.misreads(dict(params))
    mistake = builder.mistake()
    p = misreads[mistake[1]] if mistake else params
    builder.add(spec.plan.format(**p), [("misread", i) for i in range(len(misreads))])

    init = spec.wrong_init if builder.mistake() == ("init",) else spec.init
    builder.add(f"start with {spec.acc} = {init}", [("init",)])

    iterable = spec.wrong_iterable if builder.mistake() == ("skip",) else spec.iterable
    builder.add(f"go through each {spec.item} in {iterable}", [("skip",)])

    mistake = builder.mistake()
    cond = spec.wrong_cond if mistake == ("cond",) else spec.cond
    update, update_text = spec.update, spec.update_text
    if mistake == ("update",):
        update, update_text = spec.wrong_update
    options = [("cond",)] if spec.cond else []
    options += [("update",)] if spec.wrong_update else []
    prefix = f"if {cond.format(**p)}, " if cond else ""
    builder.add(prefix + update_text.format(**p), options)

    early = builder.mistake() == ("early",)
    builder.add(f"return {spec.acc}" + (" inside the loop" if early else ""), [("early",)])

    body = f"            {update}" if cond else f"        {update}"
    lines = [
        f"def {spec.name}({spec.arg}):",
        f"    {spec.acc} = {init}",
        f"    for {spec.item} in {iterable}:",
        *([f"        if {cond}:"] if cond else []),
        body,
        f"        return {spec.acc}" if early else f"    return {spec.acc}",
    ]
    return "\n".join(lines).format(**p)


def passes_in_process(code: str, tests: list) -> bool:
    """Whether our own generated `code` passes `tests`; never used on model output."""
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # trusted: written by write_plan from a fixed template
    try:
        return all(
            json.dumps(eval(call, namespace), sort_keys=True)
            == json.dumps(expected, sort_keys=True)
            for call, expected in tests
        )
    except Exception:  # a bug that crashes (e.g. None + 1) fails the tests
        return False


class ProgramWrite(TraceTask):
    """Writing a small function from a spec; graded by hidden tests in the sandbox."""

    name = "program_write"
    summary = "Restate the task, start the result, loop, update it when needed, and return it."
    defaults = {"spec": None}

    def draw_meta(self, rng: np.random.Generator, *, spec: Any, split: str) -> dict:
        """A spec, its params and its hidden tests."""
        if spec is not None and spec not in SPECS_BY_NAME:
            raise ValueError(
                f"knob spec must be None or one of {sorted(SPECS_BY_NAME)}, got {spec!r}"
            )
        chosen = SPECS_BY_NAME[spec] if spec else SPECS[int(rng.integers(len(SPECS)))]
        params = chosen.draw_params(rng)
        tests = [
            [f"{chosen.name}({', '.join(repr(a) for a in args)})", chosen.reference(params, *args)]
            for args in chosen.draw_inputs(rng, params)
        ]
        return {"spec": chosen.name, "params": params, "tests": tests}

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """The plan steps; `extra` holds the code they describe."""
        builder = TraceBuilder(fault)
        spec = SPECS_BY_NAME[meta["spec"]]
        code = write_plan(spec, meta["params"], builder)
        return finish(builder, spec.name, extra=code)

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`Write a Python function `f(xs)` that returns ...`."""
        spec = SPECS_BY_NAME[meta["spec"]]
        does = spec.does.format(**meta["params"])
        return f"Write a Python function `{spec.name}({spec.arg})` that returns {does}."

    def headline(self, meta: Mapping[str, Any]) -> str:
        """`How to write count_greater`."""
        return f"How to write {meta['spec']}"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """The code in a python block, then `Answer: <function name>`."""
        return f"Here is the function:\n```python\n{trace.extra}\n```\nAnswer: {trace.answer}"

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The answer names the function asked for."""
        return function_name(value) == meta["spec"]

    def is_wrong(self, meta: Mapping[str, Any], clean: Trace, bad: Trace) -> bool:
        """A corrupted plan is wrong when its code fails a hidden test."""
        return not passes_in_process(bad.extra, meta["tests"])

    def verify(self, problem: Problem, response: str) -> float:
        """1.0 if the answer names the function and its code passes all hidden tests."""
        try:
            value = extract_answer(response)
            code = extract_code(response)
            if value is None or code is None or not self.accepts(problem.meta, value):
                return 0.0
            return 1.0 if run_python(code, tests=problem.meta["tests"]).ok else 0.0
        except Exception:  # a verifier scores malformed output 0, never raises
            return 0.0


PROGRAM_WRITE = ProgramWrite()
