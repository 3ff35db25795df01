"""Multi-turn chat with a trained run, thoughts of finished blocks redacted from later turns.

    python -m rl.chat --workdir=DIR [--keep_thoughts] [--show_thoughts] [--raw]
    (--keep-thoughts and --show-thoughts work too)
    echo -e "What is 482 + 37?\\nNow add 17 to that." | python -m rl.chat --workdir=DIR

Each line of stdin is one user turn; EOF ends the chat. Every reply streams from the sampler
in chunks through the o1-style display (`rl.display`), and after each turn a line tells the
context length and how many tokens redaction saved. By default the context of the next turn
is `redact_thoughts(dialogue, keep_last=False)`: headlines and summaries stay, thoughts go.

`--samples=N --rerank=vote|orm|prm` samples N replies and shows the one majority voting, the
ORM (`--orm=DIR`) or the PRM (`--prm=DIR`) picks. `rl.sample` answers single questions
through the same `reply`; both share the flags `define_flags` defines.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

import jax
import numpy as np
from absl import app, flags

from data.format import (
    EOT,
    Dialogue,
    Turn,
    encode_dialogue,
    encode_prompt,
    parse_assistant,
    redact_thoughts,
    redaction_savings,
)
from model import sampler
from rl import search
from rl.display import Renderer, show
from rl.stream import decode_pieces, stream_tokens

RERANKERS = ("vote", "orm", "prm")


class ContextFullError(ValueError):
    """The conversation leaves no room in the model's context for a reply."""


@dataclasses.dataclass(frozen=True)
class ReplyOptions:
    """How to generate and show a reply."""

    max_new_tokens: int = 384
    chunk_size: int = 16
    temperature: float = 0.0  # 0 decodes greedily
    top_k: int = 0
    top_p: float = 1.0
    samples: int = 1  # > 1: sample that many and show the one `rerank` picks
    rerank: str = "vote"
    orm: str | None = None  # ORM workdir, for rerank="orm"
    prm: str | None = None  # PRM workdir, for rerank="prm"
    prm_aggregate: str = "min"  # how step scores make a response score (rl.search)
    raw: bool = False  # print the raw response text instead of the display
    show_thoughts: bool = False

    def __post_init__(self):
        if self.rerank not in RERANKERS:
            raise ValueError(f"rerank must be one of {RERANKERS}, got {self.rerank!r}")
        if self.samples < 1 or self.max_new_tokens < 1 or self.chunk_size < 1:
            raise ValueError("samples, max_new_tokens and chunk_size must be >= 1")
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError(f"--samples={self.samples} needs --temperature > 0 (e.g. 0.8)")
        if self.samples > 1 and self.rerank != "vote" and not getattr(self, self.rerank):
            raise ValueError(f"--rerank={self.rerank} needs --{self.rerank}=<reward model workdir>")


# ---------------------------------------------------------------- the conversation


def add_exchange(dialogue: Dialogue, question: str, response: str) -> Dialogue:
    """The dialogue with a user turn and the assistant turn parsed from `response`."""
    answer = parse_assistant(response).turn
    return Dialogue((*dialogue.turns, Turn("user", question), answer))


def context(dialogue: Dialogue, redact: bool) -> Dialogue:
    """What the model sees of `dialogue`: with `redact`, no thoughts of any finished turn."""
    return redact_thoughts(dialogue, keep_last=False) if redact else dialogue


def prompt_tokens(dialogue: Dialogue, tokenizer, redact: bool) -> list[int]:
    """Tokens that ask for the next assistant turn of `dialogue` (ending in a user turn)."""
    return [int(t) for t in encode_prompt(context(dialogue, redact), tokenizer)]


@dataclasses.dataclass(frozen=True)
class ContextStats:
    """Size of the context the next turn starts from, and what redaction does to it."""

    tokens: int  # tokens of the context as the model will see it
    saved: int  # tokens redaction removed (0 with redaction off)
    would_save: int  # tokens redaction removes, on or off


def context_stats(dialogue: Dialogue, tokenizer, redact: bool) -> ContextStats:
    """Context length of `dialogue` and the tokens redaction saves on it."""
    would_save = redaction_savings(dialogue, tokenizer, keep_last=False)
    tokens = encode_dialogue(context(dialogue, redact), tokenizer).tokens.size
    return ContextStats(int(tokens), would_save if redact else 0, int(would_save))


def format_stats(stats: ContextStats, redact: bool) -> str:
    """The line printed after each turn."""
    if redact:
        return f"[context: {stats.tokens} tokens; redaction saved {stats.saved} tokens]"
    return f"[context: {stats.tokens} tokens; redaction off, it would save {stats.would_save}]"


def read_turns(lines: Iterable[str]) -> Iterator[str]:
    """User turns: the non-empty lines, stripped."""
    return (line.strip() for line in lines if line.strip())


# ---------------------------------------------------------------- one reply


def sample_candidates(run, prompt: Sequence[int], options: ReplyOptions, rng) -> list[np.ndarray]:
    """`options.samples` sampled replies to one prompt: token ids, stop token included."""
    out = sampler.sample(
        run.params,
        run.model_cfg,
        [list(prompt)],
        rng=rng,
        max_new_tokens=options.max_new_tokens,
        stop_tokens=(run.tokenizer.eot_id,),
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        pad_id=run.tokenizer.pad_id,
        num_samples=options.samples,
    )
    tokens_NxT, lengths_N = np.asarray(out.tokens_BxNxT[0]), np.asarray(out.lengths_BxN[0])
    return [tokens_NxT[n, : lengths_N[n]] for n in range(options.samples)]


@functools.lru_cache(maxsize=2)
def reward_model(workdir: str):
    """The reward model of a workdir, loaded once per process and only when asked for."""
    from rl.reward_model import load_reward_model

    return load_reward_model(workdir)


def choose(question: str, responses: Sequence[str], options: ReplyOptions) -> tuple[int, str]:
    """Index of the response `options.rerank` picks, and a line saying why."""
    answers = [parse_assistant(text).answer for text in responses]
    n = len(responses)
    if options.rerank == "vote":
        winner = search.majority_vote([answers])[0]
        index = answers.index(winner) if winner is not None else 0
        votes = answers.count(winner) if winner is not None else 0
        return index, f"[sample {index + 1} of {n} by vote: answer {winner} ({votes} votes)]"
    from rl.reward_model import score_texts

    model = reward_model(getattr(options, options.rerank))
    scores = score_texts(model, [question] * n, list(responses))
    if options.rerank == "orm":
        score_N = np.asarray([s.final for s in scores], np.float32)
    else:
        probs, mask = search.pad_steps([[list(s.steps) for s in scores]])
        score_N = np.asarray(search.prm_aggregate(probs, mask, options.prm_aggregate))[0]
    index = int(search.best_of_n(score_N[None])[0])
    note = f"score {score_N[index]:.3f}, answer {answers[index]}"
    return index, f"[sample {index + 1} of {n} by {options.rerank}: {note}]"


def show_raw(pieces: Iterable[tuple[str, int]], out: TextIO) -> str:
    """Prints the raw text of a reply as it streams (without <|eot_id|>); returns it."""
    texts = []
    for text, _ in pieces:
        texts.append(text)
        out.write(text.replace(EOT, ""))
        out.flush()
    out.write("\n")
    return "".join(texts)


def reply(run, dialogue: Dialogue, options: ReplyOptions, *, redact: bool, rng, out: TextIO) -> str:
    """Answers the last user turn of `dialogue` on `out`; returns the reply text (no EOT).

    One sample streams in chunks; several are sampled together and the chosen one replayed.
    """
    tokenizer, cfg = run.tokenizer, run.model_cfg
    prompt = prompt_tokens(dialogue, tokenizer, redact)
    room = cfg.max_seq_len - len(prompt)
    if room < 1:
        raise ContextFullError(
            f"the conversation has {len(prompt)} tokens, the model's whole context "
            f"({cfg.max_seq_len}); start a new chat (or keep redaction on)"
        )
    options = dataclasses.replace(options, max_new_tokens=min(options.max_new_tokens, room))
    if options.samples == 1:
        chunks = stream_tokens(
            run.params,
            cfg,
            prompt,
            max_new_tokens=options.max_new_tokens,
            stop_tokens=(tokenizer.eot_id,),
            chunk_size=options.chunk_size,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            pad_id=tokenizer.pad_id,
            rng=rng,
        )
    else:
        candidates = sample_candidates(run, prompt, options, rng)
        texts = [tokenizer.decode(ids).removesuffix(EOT) for ids in candidates]
        index, note = choose(dialogue.turns[-1].content, texts, options)
        out.write(note + "\n")
        chunks = [candidates[index]]
    pieces = decode_pieces(tokenizer, chunks)
    if options.raw:
        text = show_raw(pieces, out)
    else:
        text = show(pieces, Renderer(out, show_thoughts=options.show_thoughts))
    return text.removesuffix(EOT)


# ---------------------------------------------------------------- the CLI


def define_flags() -> None:
    """Defines the flags rl.chat and rl.sample share: run, sampling, display, reranking."""
    flags.DEFINE_string("workdir", None, "A train.main workdir.", required=True)
    flags.DEFINE_bool("raw", False, "Print the raw response text instead of the display.")
    flags.DEFINE_bool("show_thoughts", False, "Print every thought step too.")
    flags.DEFINE_alias("show-thoughts", "show_thoughts")  # the spelling the docs use too
    flags.DEFINE_integer("max_new_tokens", 384, "Tokens to generate at most per reply.")
    flags.DEFINE_integer("chunk_size", 16, "Tokens per streamed chunk.")
    flags.DEFINE_float("temperature", 0.0, "0 decodes greedily.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("samples", 1, "Replies to sample; > 1 shows the one --rerank picks.")
    flags.DEFINE_enum("rerank", "vote", RERANKERS, "How to pick among --samples replies.")
    flags.DEFINE_string("orm", None, "Outcome reward model workdir (--rerank=orm).")
    flags.DEFINE_string("prm", None, "Process reward model workdir (--rerank=prm).")
    flags.DEFINE_enum("prm_aggregate", "min", ("min", "product", "last"), "PRM step scores.")


def options_from_flags() -> ReplyOptions:
    """ReplyOptions from the flags `define_flags` defined."""
    f = flags.FLAGS
    try:
        return ReplyOptions(
            **{field.name: f[field.name].value for field in dataclasses.fields(ReplyOptions)}
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def main(argv):
    """Chats over stdin, one user turn per line, until EOF."""
    del argv
    from train.workdir import load_run

    options = options_from_flags()
    redact = not flags.FLAGS.keep_thoughts
    run = load_run(flags.FLAGS.workdir)
    rng = jax.random.PRNGKey(flags.FLAGS.seed)
    dialogue = Dialogue(())
    interactive = sys.stdin.isatty()
    if interactive:
        print("you> ", end="", flush=True)
    for turn, question in enumerate(read_turns(sys.stdin)):
        if not interactive:
            print(f"you> {question}")
        asked = Dialogue((*dialogue.turns, Turn("user", question)))
        try:
            key = jax.random.fold_in(rng, turn)
            text = reply(run, asked, options, redact=redact, rng=key, out=sys.stdout)
        except ContextFullError as e:
            print(f"[{e}]")
            break
        dialogue = add_exchange(dialogue, question, text)
        print(format_stats(context_stats(dialogue, run.tokenizer, redact), redact), flush=True)
        if interactive:
            print("you> ", end="", flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, because rl.sample imports this module.
    define_flags()
    flags.DEFINE_bool("keep_thoughts", False, "Keep thoughts of finished turns in the context.")
    flags.DEFINE_alias("keep-thoughts", "keep_thoughts")
    app.run(main)
