"""Shared data-test fixtures: a few dozen dialogues and a tiny tokenizer trained on them."""

from __future__ import annotations

import numpy as np
import pytest

from data.format import Dialogue, ThinkingBlock, Turn, render_dialogue
from data.tokenizer import train_tokenizer

TINY_VOCAB_SIZE = 512  # an upper bound: the trained vocabulary comes out smaller
WORDS = ("strawberry", "banana", "mississippi", "raspberry", "bookkeeper", "parallel")


def addition_dialogue(a: int, b: int) -> Dialogue:
    """A column addition worked digit by digit, with explicit carries."""
    steps, carry = [], 0
    for place, (x, y) in enumerate(zip(f"{a:06d}"[::-1], f"{b:06d}"[::-1], strict=True)):
        if place >= max(len(str(a)), len(str(b))):
            break
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    block = ThinkingBlock(f"Add {a} and {b} column by column", steps, "Add digits right to left.")
    answer = f"{a} + {b} = {a + b}.\nAnswer: {a + b}"
    return Dialogue((Turn("user", f"What is {a} + {b}?"), Turn("assistant", answer, (block,))))


def letter_count_dialogue(word: str, letter: str) -> Dialogue:
    """Counting a letter with a running count, one letter per step."""
    steps, count = [], 0
    for ch in word:
        count += ch == letter
        steps.append(f"{ch} -> {count}")
    block = ThinkingBlock(f"How to count letter {letter} in word", steps, "Keep a running count.")
    prompt = f'How many times does the letter "{letter}" appear in "{word}"?'
    answer = f'The letter "{letter}" appears {count} times.\nAnswer: {count}'
    return Dialogue((Turn("user", prompt), Turn("assistant", answer, (block,))))


def sample_dialogues(n: int = 48, seed: int = 0) -> list[Dialogue]:
    """Varied dialogues: additions, letter counts, some with a system prompt or two rounds."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            word = WORDS[int(rng.integers(len(WORDS)))]
            d = letter_count_dialogue(word, word[int(rng.integers(len(word)))])
        else:
            d = addition_dialogue(int(rng.integers(1, 99999)), int(rng.integers(1, 9999)))
        if i % 3 == 0:
            d = Dialogue((Turn("system", "You think step by step."), *d.turns))
        if i % 5 == 0:
            d = Dialogue(d.turns + addition_dialogue(i + 1, 2 * i + 3).turns)
        out.append(d)
    return out


@pytest.fixture(scope="session")
def tiny_dialogues() -> list[Dialogue]:
    """The dialogues `tiny_tokenizer` was trained on."""
    return sample_dialogues()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dialogues):
    """A unigram data.tokenizer.Tokenizer trained on the rendered `tiny_dialogues`."""
    return train_tokenizer([render_dialogue(d) for d in tiny_dialogues], TINY_VOCAB_SIZE)
