"""Reading the final `Answer: <value>` line of a response, without ever raising.

Verifiers see raw model output: any text, of any length, in any script. These parsers
return None for anything malformed, so that a bad output scores 0 instead of crashing
the reward computation.
"""

from __future__ import annotations

import re

ANSWER_PREFIX = "Answer:"
_MAX_NUMBER_CHARS = 200  # far beyond any task answer; keeps int() away from huge strings
_INT_RE = re.compile(r"[+-]?(\d+|\d{1,3}(,\d{3})+)")


def extract_answer(text: str) -> str | None:
    """Value of the last line starting with `Answer:`, stripped, trailing period dropped."""
    if not isinstance(text, str):
        return None
    found = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(ANSWER_PREFIX):
            found = stripped[len(ANSWER_PREFIX) :]
    if found is None:
        return None
    value = found.strip()
    if value.endswith("."):
        value = value[:-1].rstrip()
    return value


def parse_int(value: str | None) -> int | None:
    """An integer written plainly or with thousands commas (`-5,758`), else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if len(value) > _MAX_NUMBER_CHARS or not _INT_RE.fullmatch(value):
        return None
    return int(value.replace(",", ""))


def parse_int_list(value: str | None) -> list[int] | None:
    """Integers separated by commas and/or spaces, optionally in brackets, else None."""
    if not isinstance(value, str) or len(value) > 100 * _MAX_NUMBER_CHARS:
        return None
    body = value.strip()
    if body and body[0] in "[(" and body[-1] in "])":
        body = body[1:-1]
    parts = [part for part in re.split(r"[,\s]+", body) if part]
    numbers = [parse_int(part) for part in parts]
    if not numbers or any(number is None for number in numbers):
        return None
    return numbers
