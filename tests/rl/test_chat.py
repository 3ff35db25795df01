"""Chat: redaction accounting on a scripted conversation, reranking, and tiny runs via the CLIs."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from data.format import (
    Dialogue,
    Turn,
    encode_dialogue,
    redact_thoughts,
    render_assistant,
    render_dialogue,
)
from data.multiturn import conversation, conversation_dialogue
from data.tasks.addition import ADDITION
from data.tokenizer import train_tokenizer
from rl import chat
from tests.conftest import REPO, run_cli, subprocess_env

STATS_RE = re.compile(r"\[context: (\d+) tokens; redaction saved (\d+) tokens\]")
KEPT_STATS_RE = re.compile(r"\[context: (\d+) tokens; redaction off, it would save (\d+)\]")


@pytest.fixture(scope="module")
def problems():
    """A scripted three-turn conversation with its true worked replies."""
    return conversation(ADDITION.build({"a": 482, "b": 37}), np.random.default_rng(0), 3)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer([render_dialogue(conversation_dialogue(problems, redact=False))], 400)


def scripted(problems, upto: int):
    """The chat's dialogue after `upto` exchanges answered with the true traces."""
    dialogue = Dialogue(())
    for problem in problems[:upto]:
        reply = render_assistant(conversation_dialogue([problem], redact=False).turns[-1])
        dialogue = chat.add_exchange(dialogue, problem.prompt, reply)
    return dialogue


def test_replies_are_parsed_back_into_thinking_blocks(problems):
    dialogue = scripted(problems, 2)
    assert dialogue == conversation_dialogue(problems[:2], redact=False)


def test_redaction_accounting_on_a_scripted_conversation(problems, tokenizer):
    dialogue = scripted(problems, 2)
    full = encode_dialogue(dialogue, tokenizer).tokens.size
    redacted = encode_dialogue(redact_thoughts(dialogue, keep_last=False), tokenizer).tokens.size
    stats = chat.context_stats(dialogue, tokenizer, redact=True)
    assert stats == chat.ContextStats(redacted, full - redacted, full - redacted)
    assert 0 < stats.saved < full
    kept = chat.context_stats(dialogue, tokenizer, redact=False)
    assert kept == chat.ContextStats(full, 0, full - redacted)
    assert chat.format_stats(stats, True) == (
        f"[context: {redacted} tokens; redaction saved {full - redacted} tokens]"
    )
    assert "would save" in chat.format_stats(kept, False)


def test_the_next_prompt_has_no_thoughts_of_finished_turns(problems, tokenizer):
    asked = Dialogue((*scripted(problems, 2).turns, Turn("user", problems[2].prompt)))
    redacted = tokenizer.decode(chat.prompt_tokens(asked, tokenizer, redact=True))
    full = tokenizer.decode(chat.prompt_tokens(asked, tokenizer, redact=False))
    first_step = problems[0].steps[0]
    assert first_step in full and first_step not in redacted
    assert "<|thoughts|>" not in redacted
    assert problems[0].headline in redacted and problems[1].summary in redacted
    assert redacted.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_vote_picks_a_reply_with_the_most_common_answer():
    replies = ["Answer: 5", "no answer", "Answer: 7", "Answer: 7", "Answer: 5", "Answer: 7"]
    index, note = chat.choose("q", replies, chat.ReplyOptions(samples=6, temperature=1.0))
    assert index == 2 and "answer 7 (3 votes)" in note


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(samples=4), "temperature"),
        (dict(samples=4, temperature=1.0, rerank="orm"), "--orm="),
        (dict(rerank="best"), "rerank"),
    ],
)
def test_bad_options_say_what_to_fix(options, message):
    with pytest.raises(ValueError, match=message):
        chat.ReplyOptions(**options)


@pytest.mark.parametrize("keep", [False, True])
def test_tiny_chat_reads_turns_from_stdin(tiny_run, keep):
    extra = ["--keep-thoughts"] if keep else []  # the hyphenated alias of --keep_thoughts
    proc = subprocess.run(
        [sys.executable, "-m", "rl.chat", f"--workdir={tiny_run}", "--max_new_tokens=8", *extra],
        input="What is 4821 + 937?\n\nNow add 17 to that.\n",
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("you> ") == 2 and "you> Now add 17 to that." in out
    stats_re = KEPT_STATS_RE if keep else STATS_RE
    contexts = [int(m.group(1)) for m in stats_re.finditer(out)]
    assert len(contexts) == 2 and 0 < contexts[0] < contexts[1]


def test_sample_prompt_reranks_and_displays(tiny_run):
    proc = run_cli(
        "rl.sample",
        f"--workdir={tiny_run}",
        "--prompt=What is 482 * 37?",
        "--max_new_tokens=8",
        "--samples=2",
        "--temperature=1.0",
        "--rerank=vote",
        "--show-thoughts",  # the hyphenated alias of --show_thoughts
        timeout=300,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[sample ") and "of 2 by vote" in lines[0]
    assert lines[-1] == "[cut off before the end of the turn]"  # 8 tokens end no turn
