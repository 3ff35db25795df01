"""`letter_count`: `How many times does the letter "r" appear in "strawberry"?`.

The word is spelled one letter per step, each compared with the asked letter, with a
running count (`s≠r 0`, `t≠r 0`, `r=r 1`, ...); the last count is the answer. Writing the
asked letter on every line keeps the comparison local: with bare `s 0`, `t 0`, `r 1` lines
a small model had to look the letter up in the prompt at every step, and after a
letter-count-only SFT of 120 steps it had learned to spell but never counted past 0 (21% of
held-out words right, all of them answers of 0; 82% with the comparison written out).

Words come from the `english-words` package (web2 list, lower case, letters only). Each
word belongs to one split by a stable hash of its spelling: about 10% to "test", 5% to
"validation" and 85% to "train", so no test word is ever seen in training.
Knobs: `length` (int or (min, max), the word length, drawn uniformly among lengths that
have words) and `present_prob` (how often the asked letter occurs in the word).
"""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Mapping
from typing import Any

import numpy as np

from data.tasks.answer import parse_int
from data.tasks.common import Fault, Trace, TraceBuilder, TraceTask, finish, int_range, respond

TEST_PERCENT, VALIDATION_PERCENT = 10, 5


def word_split(word: str) -> str:
    """The split a word belongs to, from a stable hash of its spelling."""
    bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "validation" if bucket < TEST_PERCENT + VALIDATION_PERCENT else "train"


@functools.cache
def word_pools() -> dict[str, dict[int, tuple[str, ...]]]:
    """Sorted words of each split, grouped by length; loaded once per process."""
    from english_words import get_english_words_set

    pools: dict[str, dict[int, list[str]]] = {"train": {}, "validation": {}, "test": {}}
    for word in sorted(get_english_words_set(["web2"], lower=True, alpha=True)):
        pools[word_split(word)].setdefault(len(word), []).append(word)
    return {
        split: {length: tuple(words) for length, words in by_length.items()}
        for split, by_length in pools.items()
    }


def misread_as(letter: str) -> list[str]:
    """Letters next to `letter` in the alphabet: what a slip of the eye turns it into."""
    index = string.ascii_lowercase.index(letter)
    return [string.ascii_lowercase[i] for i in (index - 1, index + 1) if 0 <= i < 26]


class LetterCount(TraceTask):
    """Counting one letter in an English word, letter by letter."""

    name = "letter_count"
    summary = "Compare each letter, keeping a running count."
    defaults = {"length": (3, 12), "present_prob": 0.75}

    def draw_meta(
        self, rng: np.random.Generator, *, length: Any, present_prob: Any, split: str
    ) -> dict:
        """A word of the split and a letter: one of its letters with `present_prob`."""
        low, high = int_range("length", length, minimum=1)
        if not isinstance(present_prob, float | int) or not 0.0 <= present_prob <= 1.0:
            raise ValueError(f"knob present_prob must be a number in [0, 1], got {present_prob!r}")
        pool = word_pools()[split]
        lengths = [n for n in range(low, high + 1) if pool.get(n)]
        if not lengths:
            raise ValueError(f"knob length={length!r}: no {split} words of that length")
        words = pool[lengths[int(rng.integers(len(lengths)))]]
        word = words[int(rng.integers(len(words)))]
        absent = [c for c in string.ascii_lowercase if c not in word]
        if rng.random() < present_prob or not absent:
            letter = word[int(rng.integers(len(word)))]  # by position, so repeats are asked more
        else:
            letter = absent[int(rng.integers(len(absent)))]
        return {"word": word, "letter": letter}

    def trace(self, meta: Mapping[str, Any], fault: Fault | None = None) -> Trace:
        """One `<letter>=<asked> <count>` (or `≠`) step per letter of the word."""
        word, letter = meta["word"], meta["letter"]
        builder = TraceBuilder(fault)
        count = 0
        for char in word:
            readings = misread_as(char) if char == letter else [letter]
            options = [("miscount",)] + [("misread", other) for other in readings]
            mistake = builder.mistake() or ("none",)
            seen = mistake[1] if mistake[0] == "misread" else char
            matches = seen == letter
            if mistake[0] == "miscount":
                matches = not matches
            count += matches
            builder.add(f"{seen}{'=' if matches else '≠'}{letter} {count}", options)
        return finish(builder, str(count))

    def prompt(self, meta: Mapping[str, Any]) -> str:
        """`How many times does the letter "r" appear in "strawberry"?`."""
        return f'How many times does the letter "{meta["letter"]}" appear in "{meta["word"]}"?'

    def headline(self, meta: Mapping[str, Any]) -> str:
        """`How to count the letter r`: the steps spell the word, the prompt holds it."""
        return f"How to count the letter {meta['letter']}"

    def response(self, meta: Mapping[str, Any], trace: Trace) -> str:
        """One sentence with the count, then the answer line.

        Neither this nor the headline spells the word again: copying a word of up to 12
        letters is the hard part for a small model, and the steps already do it once.
        """
        times = "time" if trace.answer == "1" else "times"
        sentence = f'The letter "{meta["letter"]}" appears {trace.answer} {times}.'
        return respond(sentence, trace.answer)

    def accepts(self, meta: Mapping[str, Any], value: str) -> bool:
        """The value is the number of occurrences."""
        return parse_int(value) == meta["word"].count(meta["letter"])


LETTER_COUNT = LetterCount()
