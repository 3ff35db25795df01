"""Multi-turn dialogues of follow-up questions, whose earlier assistant turns are redacted.

A conversation starts from a task-suite problem with a whole-number answer and goes on with
follow-ups on the previous answer::

    user: What is 482 + 37?            assistant: (block) ... Answer: 519
    user: Now add 17 to that.          assistant: (block) ... Answer: 536
    user: Now multiply that by 3.      assistant: (block) ... Answer: 1608

Each follow-up is a real `addition` or `multiplication` problem on the previous true answer
(`ADDITION.build({"a": 519, "b": 17})`), worded as a follow-up, so it has its own worked trace,
true answer and verifier. In the training dialogue every assistant turn but the last has its
thoughts redacted (headline and summary stay), as a chat shows them to the model, and only the
last assistant turn is trained on: the model learns to answer from a redacted context.

`multiturn_example(problem, tokenizer, seed=..., index=...)` is the hook for the SFT pipeline:
it turns one problem into a training example with the keys of `data.pipeline.encode_record`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from data import format as fmt
from data.tasks.addition import ADDITION
from data.tasks.answer import parse_int
from data.tasks.base import Problem
from data.tasks.multiplication import MULTIPLICATION

# Follow-up kinds: the family that works them out, the wording, and the operand range. The
# SFT mix multiplies by 2-digit numbers, so multipliers go up to 99 too.
FOLLOW_UPS = {
    "add": (ADDITION, "Now add {k} to that.", (2, 99)),
    "multiply": (MULTIPLICATION, "Now multiply that by {k}.", (2, 99)),
}
# A larger answer only gets "add" follow-ups: with 4-digit multiplicands at most, 2% of the
# three-turn training examples pass 512 tokens (17% pass 384).
MAX_MULTIPLICAND = 10**4


def whole_answer(problem: Problem) -> int | None:
    """The problem's answer as a non-negative int, or None (no follow-up can build on it)."""
    value = parse_int(problem.answer)
    return value if value is not None and value >= 0 else None


def follow_up(previous: int, kind: str, operand: int) -> Problem:
    """The follow-up `kind` ("add" or "multiply") with `operand`, on the previous answer."""
    if kind not in FOLLOW_UPS:
        raise ValueError(f"follow-up kind must be one of {sorted(FOLLOW_UPS)}, got {kind!r}")
    if previous < 0 or operand < 0:
        raise ValueError(f"follow-ups work on non-negative ints, got {previous} and {operand}")
    family, wording, _ = FOLLOW_UPS[kind]
    problem = family.build({"a": int(previous), "b": int(operand)})
    return dataclasses.replace(problem, prompt=wording.format(k=operand))


def draw_follow_up(previous: Problem, rng: np.random.Generator) -> Problem | None:
    """A random follow-up on `previous`'s answer; None if that answer is not a whole number."""
    value = whole_answer(previous)
    if value is None:
        return None
    kinds = sorted(FOLLOW_UPS) if value < MAX_MULTIPLICAND else ["add"]
    kind = kinds[int(rng.integers(len(kinds)))]
    low, high = FOLLOW_UPS[kind][2]
    return follow_up(value, kind, int(rng.integers(low, high + 1)))


def conversation(
    first: Problem, rng: np.random.Generator, num_turns: int = 3
) -> tuple[Problem, ...] | None:
    """`first` and `num_turns - 1` follow-ups, each on the previous true answer; None if
    `first` has no whole-number answer."""
    if num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    problems = [first]
    for _ in range(num_turns - 1):
        nxt = draw_follow_up(problems[-1], rng)
        if nxt is None:
            return None
        problems.append(nxt)
    return tuple(problems)


def conversation_dialogue(problems: Sequence[Problem], redact: bool = True) -> fmt.Dialogue:
    """User/assistant turns for each problem; with `redact`, thoughts only in the last turn."""
    turns = [turn for p in problems for turn in fmt.problem_to_dialogue(p).turns]
    dialogue = fmt.Dialogue(tuple(turns))
    return fmt.redact_thoughts(dialogue, keep_last=True) if redact else dialogue


def encode_conversation(
    problems: Sequence[Problem], tokenizer, redact: bool = True
) -> fmt.EncodedDialogue:
    """`encode_dialogue` of the conversation, its masks kept on the last assistant turn only."""
    dialogue = conversation_dialogue(problems, redact)
    encoded = fmt.encode_dialogue(dialogue, tokenizer)
    # Everything up to the last assistant header is context: tokenization is exact per span,
    # so the prompt of the last turn is a prefix of the whole dialogue's tokens.
    context = len(fmt.encode_prompt(fmt.Dialogue(dialogue.turns[:-1]), tokenizer))
    masks = {key: getattr(encoded, key).copy() for key in fmt.TARGET_MASKS}
    for mask in masks.values():
        mask[:context] = 0.0
    step_end = encoded.step_end.copy()
    step_end[:context] = 0
    return dataclasses.replace(encoded, step_end=step_end, num_steps=int(step_end.sum()), **masks)


def example_rng(seed: int, index: int, prompt: str) -> np.random.Generator:
    """The generator of one record's follow-ups: fixed by seed, example index and prompt."""
    return np.random.default_rng([seed, index, zlib.crc32(prompt.encode())])


def multiturn_example(
    problem: Problem,
    tokenizer,
    *,
    seed: int,
    index: int,
    max_follow_ups: int = 2,
) -> dict[str, np.ndarray] | None:
    """One problem as a multi-turn training example, or None if its answer is not whole.

    The problem gets 1..max_follow_ups follow-ups (drawn from `seed` and `index`),
    earlier turns redacted, loss on the last turn only. The keys and alignment are those of
    `data.pipeline.encode_record`: inputs, targets (shifted within the example),
    step_end_mask on inputs, and the five target masks on targets.
    """
    if max_follow_ups < 1:
        raise ValueError(f"max_follow_ups must be >= 1, got {max_follow_ups}")
    rng = example_rng(seed, index, problem.prompt)
    problems = conversation(problem, rng, num_turns=1 + int(rng.integers(1, max_follow_ups + 1)))
    if problems is None:
        return None
    encoded = encode_conversation(problems, tokenizer)
    tokens_T = encoded.tokens.astype(np.int32)
    example = {
        "inputs": tokens_T,
        "targets": np.append(tokens_T[1:], np.int32(tokenizer.pad_id)).astype(np.int32),
        "step_end_mask": encoded.step_end.astype(np.int32),
    }
    for key in fmt.TARGET_MASKS:
        example[key] = np.append(getattr(encoded, key)[1:], 0).astype(np.float32)
    return example
