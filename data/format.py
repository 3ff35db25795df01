"""The thinking-block format: records, the chat template, parsing, redaction and token masks.

A dialogue renders in the Llama-3 style::

    <|begin_of_text|>                                        (once)
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{body}<|eot_id|>   (per turn)

An assistant body is its thinking blocks, then the visible answer (`Turn.content`, last line
`Answer: <value>`). One block renders as::

    <|thinking_block|><|headline|>{headline}\\n<|thoughts|>{step 1}\\n...{step N}\\n
    <|summary|>{summary}\\n<|end_thinking_block|>\\n

(one line here, split for reading). A block without thoughts, as left by `redact_thoughts`,
has no `<|thoughts|>` span at all. Text containing the special tokens renders as is, so the
render/parse round trip holds for turns whose text contains none.

All text spans come from one function, `_dialogue_spans`, which both `render_dialogue` and
`encode_dialogue` read, so the rendered string and the token masks cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # data.tasks imports this module; a runtime import would be circular
    from data.tasks.base import Problem

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
THINKING_BLOCK = "<|thinking_block|>"
HEADLINE = "<|headline|>"
THOUGHTS = "<|thoughts|>"
SUMMARY = "<|summary|>"
END_THINKING_BLOCK = "<|end_thinking_block|>"

CHAT_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)
THINKING_MARKERS = (THINKING_BLOCK, HEADLINE, THOUGHTS, SUMMARY, END_THINKING_BLOCK)
SPECIAL_TOKENS = CHAT_TOKENS + THINKING_MARKERS
ROLES = ("system", "user", "assistant")
ANSWER_PREFIX = "Answer:"
PARTS = ("headline", "thoughts", "summary", "answer")  # the per-part masks of encode_dialogue

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
_FIELD_ORDER = {THINKING_BLOCK: 0, HEADLINE: 1, THOUGHTS: 2, SUMMARY: 3}
_NO_ANSWER = f"no '{ANSWER_PREFIX} <value>' line in the visible answer"


@dataclasses.dataclass(frozen=True)
class ThinkingBlock:
    """One thinking block: a headline, thought steps (one per line) and a summary."""

    headline: str
    thoughts: tuple[str, ...]
    summary: str

    def __post_init__(self):
        object.__setattr__(self, "thoughts", tuple(self.thoughts))
        for step in self.thoughts:
            if "\n" in step:
                raise ValueError(f"a thought step is one line; split {step!r} into several steps")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn; for the assistant, `blocks` come before the visible answer `content`."""

    role: str
    content: str = ""
    blocks: tuple[ThinkingBlock, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.blocks and self.role != "assistant":
            raise ValueError(f"only assistant turns have thinking blocks, not {self.role!r} turns")


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """A sequence of turns."""

    turns: tuple[Turn, ...]

    def __post_init__(self):
        object.__setattr__(self, "turns", tuple(self.turns))


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """What `parse_assistant` recovered from model output, and what was wrong with it."""

    turn: Turn  # blocks (unclosed ones included) and the visible text after the last block
    answer: str | None  # value of the last `Answer:` line of the visible text
    malformed: bool  # True iff `problems` is not empty
    problems: tuple[str, ...]  # human-readable reasons, in the order they were found
    complete_blocks: int  # blocks closed with headline and summary, markers in order

    @property
    def well_formed(self) -> bool:
        """A fresh response in the format: nothing wrong, an `Answer:` line, and thoughts in
        every thinking block.

        A redacted earlier turn has blocks without thoughts, so the parser accepts them, but
        in a freshly sampled response an empty block means the headline ran into the steps
        (no <|thoughts|> marker), and a step parser finds nothing to judge.
        """
        return (
            not self.malformed
            and self.answer is not None
            and all(block.thoughts for block in self.turn.blocks)
        )


# The float32 masks of an EncodedDialogue that the losses weight, in batch order.
TARGET_MASKS = ("loss_mask", "headline_mask", "thoughts_mask", "summary_mask", "answer_mask")


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedDialogue:
    """Token ids of a rendered dialogue with per-token masks, all arrays of length L."""

    tokens: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L]: assistant bodies and their closing <|eot_id|>
    headline_mask: np.ndarray  # float32 [L]: <|headline|> and the headline line
    thoughts_mask: np.ndarray  # float32 [L]: <|thoughts|> and every step line
    summary_mask: np.ndarray  # float32 [L]: <|summary|> and the summary line
    answer_mask: np.ndarray  # float32 [L]: the visible answer text
    step_end: np.ndarray  # int32 [L]: 1 on the "\n" that ends each thought step
    num_steps: int


class _Span(NamedTuple):
    """A piece of rendered text and where its tokens belong."""

    text: str
    part: str = ""  # one of PARTS, or "" for template and structure tokens
    loss: bool = False  # inside an assistant body
    step_end: bool = False  # the newline ending a thought step


# ---------------------------------------------------------------- rendering


def _block_spans(block: ThinkingBlock) -> list[_Span]:
    """Spans of one thinking block; markers go with the part they open."""
    spans = [
        _Span(THINKING_BLOCK, loss=True),
        _Span(HEADLINE, "headline", True),
        _Span(block.headline + "\n", "headline", True),
    ]
    if block.thoughts:
        spans.append(_Span(THOUGHTS, "thoughts", True))
        for step in block.thoughts:
            spans += [_Span(step, "thoughts", True), _Span("\n", "thoughts", True, True)]
    spans += [
        _Span(SUMMARY, "summary", True),
        _Span(block.summary + "\n", "summary", True),
        _Span(END_THINKING_BLOCK, loss=True),
        _Span("\n", loss=True),
    ]
    return spans


def _header_spans(role: str) -> list[_Span]:
    """Spans of a turn header: `<|start_header_id|>{role}<|end_header_id|>\\n\\n`."""
    return [_Span(START_HEADER), _Span(role), _Span(END_HEADER), _Span("\n\n")]


def _body_spans(turn: Turn) -> list[_Span]:
    """Spans of an assistant body: its blocks, then the visible answer."""
    blocks = [s for block in turn.blocks for s in _block_spans(block)]
    return [*blocks, _Span(turn.content, "answer", True)]


def _turn_spans(turn: Turn) -> list[_Span]:
    """Spans of one full turn, header to <|eot_id|>."""
    if turn.role != "assistant":
        return [*_header_spans(turn.role), _Span(turn.content), _Span(EOT)]
    return [*_header_spans("assistant"), *_body_spans(turn), _Span(EOT, loss=True)]


def _dialogue_spans(d: Dialogue) -> list[_Span]:
    """Spans of a whole dialogue; the single source of its text."""
    return [_Span(BEGIN_OF_TEXT)] + [s for turn in d.turns for s in _turn_spans(turn)]


def render_dialogue(d: Dialogue) -> str:
    """The full dialogue text, each turn closed by <|eot_id|>."""
    return "".join(s.text for s in _dialogue_spans(d))


def render_assistant(turn: Turn) -> str:
    """The body of an assistant turn: its blocks, then the visible answer."""
    return "".join(s.text for s in _body_spans(turn))


def render_generation_prompt(d: Dialogue) -> str:
    """The dialogue followed by an open assistant header: what a sampler is fed."""
    return render_dialogue(d) + "".join(s.text for s in _header_spans("assistant"))


def problem_to_dialogue(p: Problem, answer_only: bool = False) -> Dialogue:
    """User asks `p.prompt`; the assistant thinks in one block (unless answer_only) and answers."""
    blocks = () if answer_only else (ThinkingBlock(p.headline, p.steps, p.summary),)
    return Dialogue((Turn("user", p.prompt), Turn("assistant", p.response, blocks)))


# ---------------------------------------------------------------- parsing


def extract_answer(text: str) -> str | None:
    """Value of the last `Answer:` line of the visible text; None if there is none. Never raises.

    The visible text is what comes before the first <|eot_id|>, after the last
    <|end_thinking_block|>, and before any <|thinking_block|> opened after that. A line counts
    if it starts with `Answer:` (case-sensitive) after leading whitespace. The value is
    stripped of surrounding whitespace and of one trailing period ("Answer: 42." gives "42");
    an empty value gives None.
    """
    if not isinstance(text, str):
        return None
    visible = text.partition(EOT)[0].rpartition(END_THINKING_BLOCK)[2].partition(THINKING_BLOCK)[0]
    for line in reversed(visible.split("\n")):
        line = line.strip()
        if line.startswith(ANSWER_PREFIX):
            value = line[len(ANSWER_PREFIX) :].strip()
            if value.endswith("."):
                value = value[:-1].rstrip()
            return value or None
    return None


def _short(text: str) -> str:
    """A short repr of some text, for problem messages."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _field_value(text: str, closed: bool, name: str, problems: list[str]) -> str:
    """A headline/summary/thoughts text without its final newline, which a closed field needs."""
    if text.endswith("\n"):
        return text[:-1]
    if closed and text:
        problems.append(f"{name} does not end with a newline")
    elif closed and name != "thoughts":
        problems.append(f"{name} is empty: it needs at least its newline")
    return text


def _close_block(fields: dict[str, Any], closed: bool, problems: list[str]) -> ThinkingBlock:
    """Builds a block from the raw text of its fields; `closed` if <|end_thinking_block|> came."""
    last = max(fields, key=_FIELD_ORDER.__getitem__)
    values = {}
    for marker, name in ((HEADLINE, "headline"), (THOUGHTS, "thoughts"), (SUMMARY, "summary")):
        text = fields.get(marker)
        # A field cut off by the end of the text (an unclosed block) need not end in "\n".
        values[name] = (
            "" if text is None else _field_value(text, closed or marker != last, name, problems)
        )
    thoughts = tuple(values["thoughts"].split("\n")) if fields.get(THOUGHTS) else ()
    return ThinkingBlock(values["headline"], thoughts, values["summary"])


def _parse_body(text: str) -> tuple[Turn, list[str], int]:
    """Structure of an assistant body: (turn, structural problems, complete blocks)."""
    problems: list[str] = []
    body, eot, rest = text.partition(EOT)
    if eot and rest:
        problems.append(f"text after {EOT}: {_short(rest)}")
    blocks: list[ThinkingBlock] = []
    complete = 0
    content: list[str] = []  # visible text since the last block
    fields: dict[str, Any] | None = None  # marker -> raw text, for the open block
    want_newline = False  # right after <|end_thinking_block|>
    block_start = 0  # len(problems) when the open block began

    for i, piece in enumerate(_SPECIAL_RE.split(body)):
        if want_newline and (i % 2 or piece):
            want_newline = False
            if piece.startswith("\n"):
                piece = piece[1:]
            else:
                problems.append(f"no newline after {END_THINKING_BLOCK}")
        if i % 2 == 0:
            if fields is None:
                content.append(piece)
            else:
                current = max(fields, key=_FIELD_ORDER.__getitem__)
                fields[current] += piece
            continue
        if piece == THINKING_BLOCK:
            if fields is not None:
                problems.append(f"{THINKING_BLOCK} inside an unclosed block")
                blocks.append(_close_block(fields, False, problems))
            if "".join(content):
                problems.append(f"text outside a thinking block: {_short(''.join(content))}")
            content, fields = [], {THINKING_BLOCK: ""}
            block_start = len(problems)
        elif piece in (HEADLINE, THOUGHTS, SUMMARY):
            if fields is None:
                problems.append(f"{piece} outside a thinking block")
                continue
            current = max(fields, key=_FIELD_ORDER.__getitem__)
            if _FIELD_ORDER[piece] <= _FIELD_ORDER[current]:
                problems.append(f"markers out of order: {piece} after {current}")
                continue
            if current == THINKING_BLOCK and fields[THINKING_BLOCK]:
                problems.append(f"text before {HEADLINE}: {_short(fields[THINKING_BLOCK])}")
            fields[piece] = ""
        elif piece == END_THINKING_BLOCK:
            if fields is None:
                problems.append(f"{END_THINKING_BLOCK} without {THINKING_BLOCK}")
                continue
            missing = [m for m in (HEADLINE, SUMMARY) if m not in fields]
            problems.extend(f"block without {m}" for m in missing)
            blocks.append(_close_block(fields, True, problems))
            complete += len(problems) == block_start
            fields, want_newline = None, True
        else:
            problems.append(f"unexpected {piece} in an assistant turn")
    if fields is not None:
        problems.append(f"unclosed thinking block (no {END_THINKING_BLOCK})")
        blocks.append(_close_block(fields, False, problems))
    if want_newline:
        problems.append(f"no newline after {END_THINKING_BLOCK}")
    return Turn("assistant", "".join(content), tuple(blocks)), problems, complete


def parse_assistant(text: str) -> ParsedResponse:
    """Recovers an assistant turn from model output; never raises, reports what was wrong.

    Accepts a trailing <|eot_id|> and blocks without thoughts (redacted). Round trip: for a
    turn with an `Answer:` line and no special tokens in its text,
    `parse_assistant(render_assistant(t)).turn == t` and it is not malformed.
    """
    if not isinstance(text, str):
        empty = Turn("assistant")
        return ParsedResponse(empty, None, True, (f"not a string: {type(text).__name__}",), 0)
    turn, problems, complete = _parse_body(text)
    answer = extract_answer(turn.content)
    if answer is None:
        problems.append(_NO_ANSWER)
    return ParsedResponse(turn, answer, bool(problems), tuple(problems), complete)


def parse_dialogue(text: str) -> Dialogue:
    """Parses a string from `render_dialogue`; ValueError with the reason if it is not one."""
    if not text.startswith(BEGIN_OF_TEXT):
        raise ValueError(f"a rendered dialogue starts with {BEGIN_OF_TEXT}, got {_short(text)}")
    pos, turns = len(BEGIN_OF_TEXT), []
    while pos < len(text):
        where = f"turn {len(turns)} (char {pos})"
        if not text.startswith(START_HEADER, pos):
            raise ValueError(f"{where}: expected {START_HEADER}, got {_short(text[pos:])}")
        header_end = text.find(END_HEADER, pos)
        if header_end < 0:
            raise ValueError(f"{where}: header has no {END_HEADER}")
        role = text[pos + len(START_HEADER) : header_end]
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; roles are {ROLES}")
        start = header_end + len(END_HEADER)
        if not text.startswith("\n\n", start):
            raise ValueError(f"{where}: {END_HEADER} must be followed by two newlines")
        end = text.find(EOT, start)
        if end < 0:
            raise ValueError(f"{where}: the {role} turn has no closing {EOT}")
        body = text[start + 2 : end]
        if role == "assistant":
            turn, problems, _ = _parse_body(body)
            if problems:
                raise ValueError(f"{where}: malformed assistant turn: {'; '.join(problems)}")
        else:
            turn = Turn(role, body)
        turns.append(turn)
        pos = end + len(EOT)
    return Dialogue(tuple(turns))


# ---------------------------------------------------------------- redaction


def redact_thoughts(d: Dialogue, keep_last: bool = True) -> Dialogue:
    """Drops the thoughts of every block of every assistant turn but the last one.

    Headlines and summaries stay. With `keep_last=False` the last assistant turn is redacted
    too (what a chat does before it generates the next turn). Every block of a Dialogue is
    closed, so every block qualifies.
    """
    assistant = [i for i, t in enumerate(d.turns) if t.role == "assistant"]
    keep = assistant[-1] if keep_last and assistant else -1
    turns = tuple(
        dataclasses.replace(t, blocks=tuple(dataclasses.replace(b, thoughts=()) for b in t.blocks))
        if t.role == "assistant" and i != keep
        else t
        for i, t in enumerate(d.turns)
    )
    return Dialogue(turns)


def redaction_savings(d: Dialogue, tokenizer, keep_last: bool = True) -> int:
    """Tokens saved by `redact_thoughts`: len(tokens before) - len(tokens after)."""
    before = encode_dialogue(d, tokenizer).tokens.size
    return before - encode_dialogue(redact_thoughts(d, keep_last), tokenizer).tokens.size


# ---------------------------------------------------------------- token masks


def _encode_spans(spans: list[_Span], tokenizer) -> EncodedDialogue:
    """Encodes span by span, so every token knows the span it came from."""
    specials = set(SPECIAL_TOKENS)
    ids: list[int] = []
    loss: list[bool] = []
    parts: list[int] = []  # index into PARTS, or -1
    step_end: list[int] = []
    for span in spans:
        if not span.text:
            continue
        piece = (
            [tokenizer.token_id(span.text)]
            if span.text in specials
            else tokenizer.encode(span.text)
        )
        if span.step_end and not piece:
            raise ValueError("the tokenizer encodes '\\n' as no tokens; it cannot mark step ends")
        ids += piece
        loss += [span.loss] * len(piece)
        parts += [PARTS.index(span.part) if span.part else -1] * len(piece)
        step_end += [0] * (len(piece) - 1) + [int(span.step_end)]
    parts_L = np.asarray(parts, np.int32)
    masks = {f"{p}_mask": (parts_L == k).astype(np.float32) for k, p in enumerate(PARTS)}
    step_end_L = np.asarray(step_end, np.int32)
    return EncodedDialogue(
        tokens=np.asarray(ids, np.int32),
        loss_mask=np.asarray(loss, np.float32),
        step_end=step_end_L,
        num_steps=int(step_end_L.sum()),
        **masks,
    )


def encode_dialogue(d: Dialogue, tokenizer) -> EncodedDialogue:
    """Tokens of `render_dialogue(d)` with loss, part and step-end masks.

    Mask choices: `loss_mask` covers every assistant-body token and the turn's closing
    <|eot_id|>. The part markers <|headline|>, <|thoughts|> and <|summary|> belong to the part
    they open, as do the newlines ending each line of it. <|thinking_block|>,
    <|end_thinking_block|>, the newline after it and <|eot_id|> are in `loss_mask` only.
    `answer_mask` is the whole visible answer. `step_end` marks the last token of each step's
    newline: the step's last token, where a process reward model scores it.
    """
    return _encode_spans(_dialogue_spans(d), tokenizer)


def encode_prompt(d: Dialogue, tokenizer) -> np.ndarray:
    """int32 tokens of `render_generation_prompt(d)`, encoded like `encode_dialogue`."""
    return _encode_spans(_dialogue_spans(d) + _header_spans("assistant"), tokenizer).tokens
