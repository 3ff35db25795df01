"""The o1-style display: a pure state machine from streamed text to display events, and a
`rich` renderer for those events.

The state machine is fed the decoded text of the response as it streams (one token's piece
per call, ideally) and answers with events: a block opened, its headline (as soon as its line
is complete), each thought step, the running count of thought tokens, the block's summary
when it closes, then the visible answer text. It never raises on model output: markers
missing, out of order or split across pieces become `Issue` events or are waited for.

    state = DisplayState()
    for piece in pieces:
        state, events = feed(state, piece)
    events = finish(state)

`Renderer` turns events into terminal output: a spinner with the live thought count on a
TTY, plain lines (no colors, no animation) otherwise.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from data.format import END_THINKING_BLOCK as END_BLOCK
from data.format import EOT, HEADLINE, SPECIAL_TOKENS, SUMMARY, THINKING_BLOCK, THOUGHTS

# Where the stream is: outside a block ("visible"), in a block's parts, or past <|eot_id|>.
VISIBLE, OPENED, IN_HEADLINE, IN_THOUGHTS, IN_SUMMARY, AFTER_BLOCK, ENDED = (
    "visible",
    "opened",
    "headline",
    "thoughts",
    "summary",
    "after_block",
    "ended",
)
_PART_OF_MARKER = {HEADLINE: IN_HEADLINE, THOUGHTS: IN_THOUGHTS, SUMMARY: IN_SUMMARY}
_ORDER = {OPENED: 0, IN_HEADLINE: 1, IN_THOUGHTS: 2, IN_SUMMARY: 3}
_IN_BLOCK = frozenset(_ORDER)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_LONGEST_TOKEN = max(map(len, SPECIAL_TOKENS))


# ---------------------------------------------------------------- events


@dataclasses.dataclass(frozen=True)
class BlockOpened:
    """A `<|thinking_block|>` arrived; blocks count from 1."""

    block: int


@dataclasses.dataclass(frozen=True)
class Headline:
    """The headline of a block, once its line is complete."""

    block: int
    text: str


@dataclasses.dataclass(frozen=True)
class ThoughtStep:
    """One complete thought line."""

    block: int
    text: str


@dataclasses.dataclass(frozen=True)
class ThoughtCount:
    """The running number of thought tokens of a block (sent when it grows)."""

    block: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class BlockClosed:
    """A block ended: with `<|end_thinking_block|>` (`closed`), or cut off by something else."""

    block: int
    headline: str
    summary: str
    thought_tokens: int
    num_steps: int
    closed: bool


@dataclasses.dataclass(frozen=True)
class AnswerText:
    """A piece of the visible answer."""

    text: str


@dataclasses.dataclass(frozen=True)
class Issue:
    """Something wrong with the format of the stream."""

    message: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The stream is over: `eot` if the model closed its turn, False if it was cut off."""

    eot: bool


Event = (
    BlockOpened | Headline | ThoughtStep | ThoughtCount | BlockClosed | AnswerText | Issue
) | Finished


# ---------------------------------------------------------------- the state machine


@dataclasses.dataclass(frozen=True)
class DisplayState:
    """Everything the display remembers between pieces."""

    mode: str = VISIBLE
    held: str = ""  # a tail that may be the start of a special token
    block: int = 0  # blocks opened so far
    field: str = ""  # text of the current part; for thoughts, of the current line
    headline: str = ""
    headline_shown: bool = False
    thought_tokens: int = 0
    num_steps: int = 0
    reported: bool = False  # ignored text (before a headline, after <|eot_id|>) was reported


def _held_tail(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a special token."""
    for size in range(min(len(text), _LONGEST_TOKEN - 1), 0, -1):
        tail = text[-size:]
        if any(token.startswith(tail) and token != tail for token in SPECIAL_TOKENS):
            return size
    return 0


def _split(text: str) -> list[str]:
    """Text cut into plain runs and whole special tokens, in order."""
    return [part for part in _SPECIAL_RE.split(text) if part]


def _show_headline(s: DisplayState, events: list[Event]) -> DisplayState:
    """Emits the headline (the first line of the headline part) once."""
    if s.headline_shown:
        return s
    headline = s.field.split("\n", 1)[0]
    events.append(Headline(s.block, headline))
    return dataclasses.replace(s, headline=headline, headline_shown=True)


def _close_block(s: DisplayState, events: list[Event], problem: str = "") -> DisplayState:
    """Ends the open block, cut off by `problem` if given (else by <|end_thinking_block|>).

    What the block still owes comes first (its headline, a last step without its newline),
    then the problem, then `BlockClosed`. A cut-off summary part with more lines gives them
    back as visible text.
    """
    closed = not problem
    if s.mode == IN_HEADLINE:
        s = _show_headline(s, events)
    if s.mode == IN_THOUGHTS and s.field:
        events.append(ThoughtStep(s.block, s.field))
        s = dataclasses.replace(s, num_steps=s.num_steps + 1)
    if problem:
        events.append(Issue(problem))
    summary, rest = "", ""
    if s.mode == IN_SUMMARY:
        summary, _, rest = s.field.partition("\n")
    events.append(BlockClosed(s.block, s.headline, summary, s.thought_tokens, s.num_steps, closed))
    if rest and not closed:
        events.append(AnswerText(rest))
    return dataclasses.replace(s, mode=AFTER_BLOCK if closed else VISIBLE, field="")


def _on_text(s: DisplayState, text: str, events: list[Event]) -> DisplayState:
    """Plain text in the current mode."""
    if s.mode == AFTER_BLOCK:
        s = dataclasses.replace(s, mode=VISIBLE)
        text = text[1:] if text.startswith("\n") else text
    if not text:
        return s
    if s.mode == VISIBLE:
        events.append(AnswerText(text))
        return s
    if s.mode in (ENDED, OPENED):
        if not s.reported:
            where = f"after {EOT}" if s.mode == ENDED else f"before {HEADLINE}"
            events.append(Issue(f"text {where} ignored"))
        return dataclasses.replace(s, reported=True)
    s = dataclasses.replace(s, field=s.field + text)
    if s.mode == IN_HEADLINE and "\n" in s.field:
        s = _show_headline(s, events)
    if s.mode == IN_THOUGHTS:
        *steps, last = s.field.split("\n")
        events.extend(ThoughtStep(s.block, step) for step in steps)
        s = dataclasses.replace(s, field=last, num_steps=s.num_steps + len(steps))
    return s


def _on_marker(s: DisplayState, marker: str, events: list[Event]) -> DisplayState:
    """A whole special token."""
    if s.mode == ENDED:
        return _on_text(s, marker, events)
    in_block = s.mode in _IN_BLOCK
    if marker == EOT:
        if in_block:
            s = _close_block(s, events, f"block {s.block} has no {END_BLOCK}")
        events.append(Finished(eot=True))
        return dataclasses.replace(s, mode=ENDED)
    if marker == THINKING_BLOCK:
        if in_block:
            s = _close_block(s, events, f"block {s.block} has no {END_BLOCK}")
        events.append(BlockOpened(s.block + 1))
        return DisplayState(mode=OPENED, block=s.block + 1)
    if marker == END_BLOCK:
        if not in_block:
            events.append(Issue(f"{END_BLOCK} outside a block ignored"))
            return s
        return _close_block(s, events)
    if marker in _PART_OF_MARKER and in_block:
        part = _PART_OF_MARKER[marker]
        if _ORDER[part] <= _ORDER[s.mode]:
            events.append(Issue(f"{marker} out of order in block {s.block} ignored"))
            return s
        if s.mode == IN_HEADLINE:
            s = _show_headline(s, events)
        elif s.mode == IN_THOUGHTS and s.field:
            events.append(ThoughtStep(s.block, s.field))
            s = dataclasses.replace(s, num_steps=s.num_steps + 1)
        return dataclasses.replace(s, mode=part, field="")
    where = f"block {s.block}" if in_block else "the visible answer"
    events.append(Issue(f"unexpected {marker} in {where} ignored"))
    return s


def _advance(state: DisplayState, text: str, num_tokens: int) -> tuple[DisplayState, list[Event]]:
    """Processes `text` whole (nothing held back)."""
    events: list[Event] = []
    uncounted = num_tokens
    for part in _split(text):
        if part in SPECIAL_TOKENS:
            state = _on_marker(state, part, events)
            continue
        if state.mode == IN_THOUGHTS and uncounted:
            state = dataclasses.replace(state, thought_tokens=state.thought_tokens + uncounted)
            events.append(ThoughtCount(state.block, state.thought_tokens))
            uncounted = 0
        state = _on_text(state, part, events)
    return state, events


def feed(state: DisplayState, piece: str, num_tokens: int = 1) -> tuple[DisplayState, list[Event]]:
    """Advances the display by one piece of decoded text (`num_tokens` tokens); never raises.

    A tail that may be the start of a special token waits for the next piece. Thought tokens
    are counted per call: the call's tokens count if it adds text to the thoughts, so feed one
    token's piece per call for an exact count (markers do not count).
    """
    text = state.held + (piece if isinstance(piece, str) else "")
    keep = _held_tail(text)
    state, events = _advance(state, text[: len(text) - keep], num_tokens)
    return dataclasses.replace(state, held=text[len(text) - keep :]), events


def finish(state: DisplayState) -> list[Event]:
    """The events that end a stream: held text, an unclosed block, and `Finished`."""
    state, events = _advance(state, state.held, 0)
    if state.mode == ENDED:
        return events
    if state.mode in _IN_BLOCK:
        state = _close_block(state, events, f"the stream ended inside block {state.block}")
    events.append(Finished(eot=False))
    return events


def replay(pieces: Iterable[str]) -> list[Event]:
    """All events of a finished stream of pieces (one token each)."""
    state, events = DisplayState(), []
    for piece in pieces:
        state, new = feed(state, piece)
        events += new
    return events + finish(state)


# ---------------------------------------------------------------- rendering


class Renderer:
    """Prints events with `rich`: a spinner and live thought count on a TTY, plain lines else.

    Headlines print as `Thinking: ...`, summaries as `Summary: ... (N thought tokens)`, thought
    steps (with `show_thoughts`) indented, the visible answer as it streams.
    """

    def __init__(
        self,
        file: TextIO | None = None,
        *,
        show_thoughts: bool = False,
        force_terminal: bool | None = None,
    ):
        self.console = Console(
            file=file or sys.stdout,
            force_terminal=force_terminal,  # None: decide by whether `file` is a TTY
            highlight=False,
            markup=False,
            emoji=False,
            soft_wrap=True,
        )
        self.show_thoughts = show_thoughts
        self._live: Live | None = None
        self._spinner: Spinner | None = None
        self._at_line_start = True

    def __call__(self, event: Event) -> None:
        """Prints one event."""
        match event:
            case BlockOpened():
                self._start_spinner("thinking")
            case Headline(text=text):
                self._line(Text.assemble(("Thinking: ", "bold cyan"), (text, "bold")))
            case ThoughtStep(text=text) if self.show_thoughts:
                self._line(Text("  | " + text, style="dim"))
            case ThoughtCount(tokens=tokens) if self._spinner is not None:
                self._spinner.update(text=Text(f"thinking... {tokens} thought tokens", "dim"))
            case BlockClosed() as e:
                self._stop_spinner()
                tail = f" ({e.thought_tokens} thought tokens{'' if e.closed else ', unclosed'})"
                summary = Text.assemble(("Summary: ", "bold green"), e.summary, (tail, "dim"))
                self._line(summary)
            case AnswerText(text=text):
                self.console.print(Text(text), end="")
                self._at_line_start = text.endswith("\n")
            case Issue(message=message):
                self._line(Text(f"[format] {message}", style="yellow"))
            case Finished(eot=eot):
                self._stop_spinner()
                if not eot:
                    self._line(Text("[cut off before the end of the turn]", style="yellow"))
                self._end_line()

    def close(self) -> None:
        """Stops the spinner, if one is running."""
        self._stop_spinner()

    def _line(self, text: Text) -> None:
        """A whole line, starting on a fresh one."""
        self._end_line()
        self.console.print(text)

    def _end_line(self) -> None:
        """Ends a half-printed line of answer text."""
        if not self._at_line_start:
            self.console.print()
            self._at_line_start = True

    def _start_spinner(self, label: str) -> None:
        """A live spinner, only on a terminal: a pipe gets no animation."""
        self._end_line()
        if not self.console.is_terminal:
            return
        self._stop_spinner()
        self._spinner = Spinner("dots", text=Text(label, "dim"))
        self._live = Live(self._spinner, console=self.console, transient=True)
        self._live.start()

    def _stop_spinner(self) -> None:
        if self._live is not None:
            self._live.stop()
        self._live = self._spinner = None


def show(pieces: Iterable[tuple[str, int]], render) -> str:
    """Feeds (text, num_tokens) pieces through the display into `render`; returns all text."""
    state, texts = DisplayState(), []
    try:
        for text, count in pieces:
            texts.append(text)
            state, events = feed(state, text, count)
            for event in events:
                render(event)
        for event in finish(state):
            render(event)
    finally:
        if hasattr(render, "close"):
            render.close()
    return "".join(texts)
