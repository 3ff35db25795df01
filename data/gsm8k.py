"""GSM8K-format JSONL as `Problem`s: grade-school word problems with worked solutions.

Each line is `{"question": ..., "answer": "reasoning lines...\\n#### 42"}`. The reasoning
lines become thought steps (with GSM8K's `<<48/2=24>>` calculator annotations removed) and
the value after `####` becomes the answer. GSM8K is not a generator family in
`data.tasks`, so its verifier lives here: score responses with `verify_gsm8k`.
"""

from __future__ import annotations

import decimal
import json
import re
from pathlib import Path

from absl import logging

from data.tasks.answer import extract_answer
from data.tasks.base import Problem

TASK = "gsm8k"
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_HEADLINE = "How to solve this word problem"
_MAX_NUMBER_CHARS = 100  # keeps Decimal away from pathological model output
_SUMMARY = "Work out each quantity in turn, then combine them into the final value."


def load_gsm8k(path: str | Path, *, strict: bool = True) -> list[Problem]:
    """Reads a GSM8K JSONL file; a malformed line raises (or is skipped if not `strict`)."""
    problems, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                problems.append(parse_gsm8k_line(line))
            except ValueError as e:
                if strict:
                    raise ValueError(f"{path}:{line_number}: {e}") from None
                skipped += 1
    if skipped:
        logging.warning("Skipped %d malformed GSM8K lines in %s.", skipped, path)
    return problems


def parse_gsm8k_line(line: str) -> Problem:
    """Turns one JSONL line into a Problem; raises ValueError saying what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object with 'question' and 'answer'")
    question, solution = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing or empty string field 'question'")
    if not isinstance(solution, str) or "####" not in solution:
        raise ValueError("field 'answer' must be a string ending in '#### <number>'")
    reasoning, _, value = solution.rpartition("####")
    value = value.strip().replace(",", "")
    if _as_number(value) is None:
        raise ValueError(f"final answer {value!r} after '####' is not a number")
    steps = tuple(
        step
        for step in (" ".join(_ANNOTATION.sub("", s).split()) for s in reasoning.splitlines())
        if step
    )
    return Problem(
        task=TASK,
        prompt=" ".join(question.split()),
        answer=value,
        headline=_HEADLINE,
        steps=steps,
        summary=_SUMMARY,
        response=f"So the answer is {value}.\nAnswer: {value}",
    )


def verify_gsm8k(problem: Problem, response: str) -> float:
    """1.0 if the response's `Answer:` value equals the problem's numerically; never raises."""
    got = _as_number(extract_answer(response) or "")
    want = _as_number(problem.answer)
    return float(got is not None and got == want)


def _as_number(text: str) -> decimal.Decimal | None:
    """Parses '1,234.50' or '$7' as a Decimal (so 18 == 18.00); None if not a number."""
    cleaned = text.strip().replace(",", "").removeprefix("$").rstrip(".")
    if len(cleaned) > _MAX_NUMBER_CHARS:
        return None
    try:
        number = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        return None
    return number if number.is_finite() else None
