"""Tests for data.format: rendering, parsing model output, redaction and token masks."""

from __future__ import annotations

import numpy as np
import pytest

from data.format import (
    EOT,
    SPECIAL_TOKENS,
    THINKING_BLOCK,
    THOUGHTS,
    Dialogue,
    ThinkingBlock,
    Turn,
    encode_dialogue,
    encode_prompt,
    extract_answer,
    parse_assistant,
    parse_dialogue,
    problem_to_dialogue,
    redact_thoughts,
    redaction_savings,
    render_assistant,
    render_dialogue,
    render_generation_prompt,
)
from data.tasks.base import Problem
from tests.data.conftest import addition_dialogue, letter_count_dialogue

ADD = ThinkingBlock(
    "Add 12 and 34 by columns", ("units: 2+4=6", "tens: 1+3=4"), "Units, then tens."
)
CHECK = ThinkingBlock("Check", ("46-34=12", "", "ok"), "Subtract back.")
WELL_FORMED = (
    Turn("assistant", "12 + 34 = 46.\nAnswer: 46", (ADD,)),
    Turn("assistant", "Answer: 46", (ADD, CHECK)),
    Turn("assistant", "Answer: 7"),  # answer only
    Turn("assistant", "\nsee above\nAnswer: 46\n", (ThinkingBlock("Recall", (), "Known."),)),
    Turn("assistant", "Answer: x", (ThinkingBlock("", ("",), ""),)),
)
SMALL = Dialogue(
    (
        Turn("system", "Be brief."),
        Turn("user", "What is 12 + 34?"),
        Turn("assistant", "12 + 34 = 46.\nAnswer: 46", (ADD,)),
    )
)


@pytest.mark.parametrize("turn", WELL_FORMED)
def test_render_parse_round_trip(turn):
    parsed = parse_assistant(render_assistant(turn))
    assert parsed.turn == turn
    assert not parsed.malformed and parsed.problems == ()
    assert parsed.complete_blocks == len(turn.blocks)
    assert parsed.answer == extract_answer(turn.content)
    assert parse_assistant(render_assistant(turn) + EOT).turn == turn


def test_render_matches_the_documented_template():
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 12 + 34?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "<|thinking_block|><|headline|>Add 12 and 34 by columns\n"
        "<|thoughts|>units: 2+4=6\ntens: 1+3=4\n<|summary|>Units, then tens.\n"
        "<|end_thinking_block|>\n12 + 34 = 46.\nAnswer: 46<|eot_id|>"
    )
    assert render_dialogue(SMALL) == expected
    assert render_generation_prompt(SMALL) == (
        expected + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_parse_dialogue_round_trip_and_errors(tiny_dialogues):
    for d in [SMALL, redact_thoughts(SMALL, keep_last=False), *tiny_dialogues]:
        assert parse_dialogue(render_dialogue(d)) == d
    text = render_dialogue(SMALL)
    for bad, reason in [
        ("hello", "starts with"),
        (text[: -len(EOT)], "no closing"),
        (text.replace("system", "robot"), "unknown role"),
        (text.replace("<|summary|>", ""), "malformed assistant turn"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_dialogue(bad)


def test_problem_to_dialogue():
    problem = Problem(
        task="addition",
        prompt="What is 4821 + 937?",
        answer="5758",
        headline="Add the columns",
        steps=("1+7=8", "2+3=5", "8+9=17, carry 1", "4+1=5"),
        summary="Right to left with carries.",
        response="4821 + 937 = 5758.\nAnswer: 5758",
    )
    d = problem_to_dialogue(problem)
    assert [t.role for t in d.turns] == ["user", "assistant"]
    assert d.turns[0].content == problem.prompt
    assert d.turns[1].blocks == (ThinkingBlock(problem.headline, problem.steps, problem.summary),)
    parsed = parse_assistant(render_assistant(d.turns[1]))
    assert parsed.answer == "5758" and not parsed.malformed
    plain = problem_to_dialogue(problem, answer_only=True)
    assert plain.turns[1] == Turn("assistant", problem.response)
    assert THINKING_BLOCK not in render_dialogue(plain)


def test_records_reject_bad_input():
    with pytest.raises(ValueError, match="one line"):
        ThinkingBlock("h", ("two\nlines",), "s")
    with pytest.raises(ValueError, match="role"):
        Turn("robot", "hi")
    with pytest.raises(ValueError, match="only assistant"):
        Turn("user", "hi", (ADD,))
    assert ThinkingBlock("h", ["a", "b"], "s").thoughts == ("a", "b")  # lists become tuples


BLOCK = "<|thinking_block|><|headline|>h\n<|thoughts|>a\nb\n<|summary|>s\n<|end_thinking_block|>\n"
REDACTED = BLOCK.replace("<|thoughts|>a\nb\n", "")
NO_NEWLINES = BLOCK.replace("\n", "")
UNCLOSED = BLOCK.replace("<|end_thinking_block|>\n", "")
# (model output, malformed, answer, complete blocks, a problem that must be reported)
BROKEN = [
    ("", True, None, 0, "no 'Answer:"),
    ("<|thinking_block|><|headline|>h\n<|thoughts|>a\nb", True, None, 0, "unclosed"),
    (BLOCK.replace("<|summary|>s\n", ""), True, None, 0, "without <|summary|>"),
    (BLOCK.replace("<|summary|>s\n", "") + "Answer: 3", True, "3", 0, "without <|summary|>"),
    (
        "<|thinking_block|><|summary|>s\n<|headline|>h\n<|end_thinking_block|>\nAnswer: 1",
        True,
        "1",
        0,
        "out of order",
    ),
    (BLOCK + "The end.", True, None, 1, "no 'Answer:"),
    (BLOCK + "Answer: 1\nAnswer: 2.", False, "2", 1, None),
    ("\x00\xff\ufffd garbage \x7f", True, None, 0, "no 'Answer:"),
    ("Answer: 5" + EOT + "more text", True, "5", 0, "after <|eot_id|>"),
    (BLOCK + "Answer: 5" + EOT, False, "5", 1, None),
    (REDACTED + "Answer: 9", False, "9", 1, None),
    (NO_NEWLINES + "Answer: 4", True, "4", 0, "newline"),
    ("oops\n" + BLOCK + "Answer: 4", True, "4", 1, "outside a thinking block"),
    (BLOCK + UNCLOSED + "Answer: 4", True, None, 1, "unclosed"),
    ("<|summary|>stray\nAnswer: 4", True, "4", 0, "outside a thinking block"),
    ("<|start_header_id|>assistant<|end_header_id|>\n\nAnswer: 4", True, "4", 0, "unexpected"),
    ("<|thinking_block|>" * 3, True, None, 0, "inside an unclosed block"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "malformed", "answer", "complete", "problem"), BROKEN)
def test_broken_outputs_never_raise(text, malformed, answer, complete, problem):
    parsed = parse_assistant(text)
    assert parsed.malformed == malformed == bool(parsed.problems)
    assert parsed.answer == answer
    assert parsed.complete_blocks == complete
    if problem is not None:
        assert any(problem in p for p in parsed.problems), parsed.problems


def test_unclosed_block_keeps_its_thoughts():
    parsed = parse_assistant("<|thinking_block|><|headline|>h\n<|thoughts|>step 1\nstep 2\nste")
    assert parsed.turn.blocks == (ThinkingBlock("h", ("step 1", "step 2", "ste"), ""),)


def test_parser_survives_random_marker_soup():
    rng = np.random.default_rng(0)
    alphabet = [*SPECIAL_TOKENS, "\n", "x", " ", "Answer: 4", "\x00", "é", "<|", "|>"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 14)))
        parsed = parse_assistant(text)
        assert parsed.malformed == bool(parsed.problems)
        assert parsed.complete_blocks <= len(parsed.turn.blocks)
        assert parsed.answer == extract_answer(parsed.turn.content)
        extract_answer(text)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Answer: 42", "42"),
        ("Answer:   42.  ", "42"),
        ("Answer: 3.5", "3.5"),
        ("  Answer: yes\n", "yes"),
        ("Answer: 1\nthen\nAnswer: 2", "2"),
        ("Answer:", None),
        ("answer: 42", None),
        ("The Answer: 42", None),
        (BLOCK.replace("a\nb", "Answer: 7") + "Answer: 8" + EOT + "Answer: 9", "8"),
        ("<|thinking_block|><|thoughts|>Answer: 7", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def runs(tokenizer, tokens, mask) -> list[str]:
    """Decoded text of each maximal run of tokens under `mask`."""
    out, current = [], []
    for token, on in zip(tokens, mask, strict=True):
        if on:
            current.append(token)
        elif current:
            out, current = out + [tokenizer.decode(current)], []
    return out + ([tokenizer.decode(current)] if current else [])


def test_masks_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    e = encode_dialogue(SMALL, tok)
    assert tok.decode(e.tokens) == render_dialogue(SMALL)
    assert list(e.tokens) == tok.encode(render_dialogue(SMALL))
    assert e.tokens.dtype == np.int32 and e.step_end.dtype == np.int32
    for mask in (e.loss_mask, e.headline_mask, e.thoughts_mask, e.summary_mask, e.answer_mask):
        assert mask.dtype == np.float32 and mask.shape == e.tokens.shape
        assert set(np.unique(mask)) <= {0.0, 1.0} and np.all(mask <= e.loss_mask)
    parts = e.headline_mask + e.thoughts_mask + e.summary_mask + e.answer_mask
    assert parts.max() == 1.0  # the parts are disjoint

    assert runs(tok, e.tokens, e.loss_mask == 0) == [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 12 + 34?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ]
    assert runs(tok, e.tokens, e.loss_mask) == [render_assistant(SMALL.turns[2]) + EOT]
    assert runs(tok, e.tokens, e.headline_mask) == ["<|headline|>Add 12 and 34 by columns\n"]
    assert runs(tok, e.tokens, e.thoughts_mask) == ["<|thoughts|>units: 2+4=6\ntens: 1+3=4\n"]
    assert runs(tok, e.tokens, e.summary_mask) == ["<|summary|>Units, then tens.\n"]
    assert runs(tok, e.tokens, e.answer_mask) == ["12 + 34 = 46.\nAnswer: 46"]
    assert runs(tok, e.tokens, (e.loss_mask == 1) & (parts == 0)) == [
        "<|thinking_block|>",
        "<|end_thinking_block|>\n",
        "<|eot_id|>",
    ]


def test_step_end_marks_the_newline_of_each_step(tiny_tokenizer, tiny_dialogues):
    tok = tiny_tokenizer
    for d in [SMALL, *tiny_dialogues[:10]]:
        e = encode_dialogue(d, tok)
        steps = [s for t in d.turns for b in t.blocks for s in b.thoughts]
        assert e.num_steps == len(steps) == e.step_end.sum()
        ends = np.flatnonzero(e.step_end)
        assert all(tok.decode([e.tokens[i]]) == "\n" for i in ends)
        assert all(e.thoughts_mask[i] == 1 for i in ends)
        for step, i in zip(steps, ends, strict=True):
            assert tok.decode(e.tokens[: i + 1]).endswith(f"{step}\n")


def test_encode_prompt_is_the_generation_prompt(tiny_tokenizer):
    prompt = Dialogue(SMALL.turns[:2])
    tokens = encode_prompt(prompt, tiny_tokenizer)
    assert tokens.dtype == np.int32
    assert tiny_tokenizer.decode(tokens) == render_generation_prompt(prompt)
    full = encode_dialogue(SMALL, tiny_tokenizer).tokens
    assert list(full[: len(tokens)]) == list(tokens)


def test_multi_turn_redaction(tiny_tokenizer):
    rounds = [addition_dialogue(482, 37), letter_count_dialogue("strawberry", "r")]
    rounds.append(addition_dialogue(4821, 937))
    d = Dialogue(tuple(t for r in rounds for t in r.turns))
    redacted = redact_thoughts(d)
    assistant = [i for i, t in enumerate(d.turns) if t.role == "assistant"]
    for i, (before, after) in enumerate(zip(d.turns, redacted.turns, strict=True)):
        if i in assistant[:-1]:
            assert [b.thoughts for b in after.blocks] == [()]
            assert [(b.headline, b.summary) for b in after.blocks] == [
                (b.headline, b.summary) for b in before.blocks
            ]
            assert after.content == before.content
        else:
            assert after == before
    text = render_dialogue(redacted)
    assert text.count(THOUGHTS) == 1 and text.count(THINKING_BLOCK) == 3
    assert parse_dialogue(text) == redacted

    savings = redaction_savings(d, tiny_tokenizer)
    tokens_before = len(tiny_tokenizer.encode(render_dialogue(d)))
    assert savings > 0 and savings == tokens_before - len(tiny_tokenizer.encode(text))
    assert redaction_savings(d, tiny_tokenizer, keep_last=False) > savings
    assert render_dialogue(redact_thoughts(d, keep_last=False)).count(THOUGHTS) == 0
