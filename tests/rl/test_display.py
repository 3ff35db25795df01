"""The display state machine on scripted streams (whole, chunked, broken) and its renderer."""

from __future__ import annotations

import io
import re

import pytest

from data.format import SPECIAL_TOKENS
from rl import display
from rl.display import (
    AnswerText,
    BlockClosed,
    BlockOpened,
    Finished,
    Headline,
    Issue,
    ThoughtCount,
    ThoughtStep,
)

BLOCK = (
    "<|thinking_block|><|headline|>How to add 482 and 37 column by column\n"
    "<|thoughts|>2+7+0=9, write 9, carry 0\n8+3+0=11, write 1, carry 1\n"
    "4+0+1=5, write 5, carry 0\n482+37=519\n"
    "<|summary|>Add each column from the right with the carry.\n<|end_thinking_block|>\n"
)
ANSWER = "Adding column by column, 482 + 37 = 519.\nAnswer: 519"
RESPONSE = BLOCK + ANSWER + "<|eot_id|>"
_TOKEN_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + r"|\w+|\s|[^\w\s])")


def tokens(text: str) -> list[str]:
    """A stand-in tokenizer: special tokens whole, then words, spaces and symbols."""
    return [piece for piece in _TOKEN_RE.split(text) if piece]


def chunks(text: str, size: int) -> list[str]:
    """Fixed-size character chunks, which split markers anywhere."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def of_type(events, kind):
    return [e for e in events if isinstance(e, kind)]


def answer_text(events) -> str:
    return "".join(e.text for e in of_type(events, AnswerText))


def test_well_formed_stream_gives_headline_steps_summary_answer():
    pieces = tokens(RESPONSE)
    events = display.replay(pieces)
    assert not of_type(events, Issue)
    assert of_type(events, BlockOpened) == [BlockOpened(1)]
    assert of_type(events, Headline) == [Headline(1, "How to add 482 and 37 column by column")]
    steps = [e.text for e in of_type(events, ThoughtStep)]
    assert steps == ["2+7+0=9, write 9, carry 0", "8+3+0=11, write 1, carry 1"] + [
        "4+0+1=5, write 5, carry 0",
        "482+37=519",
    ]
    # One count per thought token: every piece between <|thoughts|> and <|summary|>.
    thoughts = BLOCK[BLOCK.index("<|thoughts|>") + 12 : BLOCK.index("<|summary|>")]
    counts = [e.tokens for e in of_type(events, ThoughtCount)]
    assert counts == list(range(1, len(tokens(thoughts)) + 1))
    (closed,) = of_type(events, BlockClosed)
    assert closed == BlockClosed(
        1,
        "How to add 482 and 37 column by column",
        "Add each column from the right with the carry.",
        counts[-1],
        4,
        True,
    )
    assert answer_text(events) == ANSWER
    assert events[-1] == Finished(eot=True)


def test_headline_comes_before_any_thought_and_the_answer_after_the_summary():
    events = display.replay(tokens(RESPONSE))
    order = [type(e).__name__ for e in events if not isinstance(e, ThoughtCount)]
    assert order.index("Headline") < order.index("ThoughtStep")
    assert order.index("BlockClosed") < order.index("AnswerText")


def test_headline_shows_as_soon_as_its_line_is_complete():
    state, events = display.feed(display.DisplayState(), "<|thinking_block|><|headline|>Plan")
    assert not of_type(events, Headline)
    state, events = display.feed(state, " it\n")
    assert of_type(events, Headline) == [Headline(1, "Plan it")]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_markers_split_across_chunks_change_nothing_but_counts(size):
    def shape(events):
        kept = [e for e in events if not isinstance(e, ThoughtCount | AnswerText)]
        return [e if not isinstance(e, BlockClosed) else e.summary for e in kept]

    whole = display.replay(tokens(RESPONSE))
    split = display.replay(chunks(RESPONSE, size))
    assert shape(split) == shape(whole)
    assert answer_text(split) == ANSWER


def test_missing_end_marker_recovers_summary_and_answer():
    broken = RESPONSE.replace("<|end_thinking_block|>\n", "")
    events = display.replay(tokens(broken))
    assert any("no <|end_thinking_block|>" in e.message for e in of_type(events, Issue))
    (closed,) = of_type(events, BlockClosed)
    assert not closed.closed
    assert closed.summary == "Add each column from the right with the carry."
    assert answer_text(events) == ANSWER
    assert events[-1] == Finished(eot=True)


def test_stream_ending_mid_block_closes_it_and_reports_the_cut():
    cut = RESPONSE[: RESPONSE.index("8+3+0=11") + 5]  # inside the second step
    events = display.replay(tokens(cut))
    assert [e.text for e in of_type(events, ThoughtStep)] == ["2+7+0=9, write 9, carry 0", "8+3+0"]
    assert any("ended inside block 1" in e.message for e in of_type(events, Issue))
    (closed,) = of_type(events, BlockClosed)
    assert not closed.closed and closed.summary == "" and closed.num_steps == 2
    assert events[-1] == Finished(eot=False)
    assert answer_text(events) == ""


def test_a_partial_marker_waits_and_is_flushed_as_text_at_the_end():
    state, events = display.feed(display.DisplayState(), "x <|thin")
    assert answer_text(events) == "x "
    events = display.finish(state)
    assert answer_text(events) == "<|thin"
    assert events[-1] == Finished(eot=False)


def test_a_lone_angle_bracket_is_only_held_until_the_next_piece():
    state, first = display.feed(display.DisplayState(), "a <")
    state, second = display.feed(state, " b")
    assert answer_text(first) == "a " and answer_text(second) == "< b"


def test_two_blocks_are_numbered_and_both_close():
    events = display.replay(tokens(BLOCK + BLOCK.replace("482", "519") + ANSWER + "<|eot_id|>"))
    assert [e.block for e in of_type(events, BlockClosed)] == [1, 2]
    assert [e.text.split()[3] for e in of_type(events, Headline)] == ["482", "519"]
    assert not of_type(events, Issue)


def test_misplaced_markers_are_reported_and_ignored():
    text = (
        "<|thinking_block|><|headline|>H\n<|summary|>S\n<|thoughts|>late\n<|end_thinking_block|>\n"
    )
    events = display.replay(tokens(text + "<|headline|>Answer: 1<|eot_id|> extra"))
    messages = [e.message for e in of_type(events, Issue)]
    assert any("<|thoughts|> out of order" in m for m in messages)
    assert any("unexpected <|headline|>" in m for m in messages)
    assert any("after <|eot_id|>" in m for m in messages)
    assert answer_text(events) == "Answer: 1"
    assert of_type(events, BlockClosed)[0].summary == "S"


def test_non_text_input_never_raises():
    state, events = display.feed(display.DisplayState(), None)
    assert events == [] and display.finish(state) == [Finished(eot=False)]


def test_plain_renderer_prints_lines_without_escape_codes():
    out = io.StringIO()
    display.show([(p, 1) for p in tokens(RESPONSE)], display.Renderer(out))
    text = out.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "Thinking: How to add 482 and 37 column by column"
    assert re.fullmatch(r"Summary: Add each column .*\(\d+ thought tokens\)", lines[1])
    assert lines[2:] == ANSWER.splitlines()
    assert "2+7+0=9" not in text


def test_show_thoughts_and_a_cut_off_stream():
    out = io.StringIO()
    cut = RESPONSE[: RESPONSE.index("<|summary|>")]
    display.show([(p, 1) for p in tokens(cut)], display.Renderer(out, show_thoughts=True))
    text = out.getvalue()
    assert "  | 2+7+0=9, write 9, carry 0" in text
    assert "unclosed" in text and "[format] the stream ended inside block 1" in text
    assert text.rstrip().endswith("[cut off before the end of the turn]")


def test_terminal_renderer_runs_the_spinner_and_prints_the_same_text():
    out = io.StringIO()
    display.show([(p, 1) for p in tokens(RESPONSE)], display.Renderer(out, force_terminal=True))
    raw = out.getvalue()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "thinking" in plain  # the spinner's label
    assert raw.index("\x1b[?25l") < raw.index("\x1b[?25h") < raw.index("Summary")  # it stopped
    assert "Thinking: How to add 482 and 37" in plain and plain.endswith("Answer: 519\n")


def test_stray_text_in_a_block_is_reported_once():
    text = "<|thinking_block|>a b c<|headline|>H\n<|summary|>S\n<|end_thinking_block|>\nAnswer: 1"
    events = display.replay(tokens(text))
    assert [e.message for e in of_type(events, Issue)] == ["text before <|headline|> ignored"]
    assert answer_text(events) == "Answer: 1"


def test_a_cut_off_block_shows_what_it_owes_before_the_problem():
    events = display.replay(tokens("<|thinking_block|><|headline|>Plan<|eot_id|>"))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["BlockOpened", "Headline", "Issue", "BlockClosed", "Finished"]
    assert events[1] == Headline(1, "Plan")
    cut = display.replay(tokens("<|thinking_block|><|headline|>P\n<|thoughts|>a\nb"))
    order = [type(e).__name__ for e in cut if not isinstance(e, ThoughtCount)]
    assert order[-4:] == ["ThoughtStep", "Issue", "BlockClosed", "Finished"]
