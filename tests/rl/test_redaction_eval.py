"""Redaction evaluation: the turn-by-turn bookkeeping with a scripted model, and the table."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from data.format import render_assistant, render_dialogue
from data.multiturn import conversation, conversation_dialogue
from data.tasks.addition import ADDITION
from data.tasks.multiplication import MULTIPLICATION
from data.tasks.sorting import SORTING
from data.tokenizer import train_tokenizer
from rl import redaction_eval

FIRSTS = [
    MULTIPLICATION.build({"a": 482, "b": 37}),
    SORTING.generate(np.random.default_rng(0)),  # no whole answer: skipped
    ADDITION.build({"a": 4821, "b": 937}),
]


@pytest.fixture(scope="module")
def run():
    """A stand-in for a loaded run: a tokenizer and a context far larger than any prompt."""
    rng = np.random.default_rng(0)
    texts = [
        render_dialogue(conversation_dialogue(conversation(p, rng, 3), redact=False))
        for p in (FIRSTS[0], FIRSTS[2])
    ]
    tokenizer = train_tokenizer(texts, 400)
    return types.SimpleNamespace(tokenizer=tokenizer, model_cfg=None, params=None, step=7)


def scripted_model(conversations, wrong_when_full=()):
    """A `complete` that answers each question with its true worked reply.

    With a full context (turns 2 on), the conversations in `wrong_when_full` answer wrongly.
    """
    by_prompt = {p.prompt: (i, p) for i, c in enumerate(conversations) for p in c}

    def complete(run, prompts, *, max_new_tokens, batch_size):
        replies = []
        for prompt in prompts:
            text = run.tokenizer.decode(list(prompt))
            question = text.split("<|start_header_id|>user<|end_header_id|>\n\n")[-1]
            index, problem = by_prompt[question.split("<|eot_id|>")[0]]
            reply = render_assistant(conversation_dialogue([problem], redact=False).turns[-1])
            if index in wrong_when_full and "<|thoughts|>" in text:  # a full context
                reply = reply.replace(f"Answer: {problem.answer}", "Answer: -1")
            replies.append(reply)
        return replies

    return complete


def test_turns_are_scored_against_true_answers_and_redaction_saves_context(run, monkeypatch):
    conversations = redaction_eval.build_conversations(FIRSTS, num=5, turns=3, seed=0)
    assert [c[0] for c in conversations] == [FIRSTS[0], FIRSTS[2]]
    monkeypatch.setattr(redaction_eval, "complete", scripted_model(conversations, {1}))
    summary = redaction_eval.evaluate_redaction(
        run, FIRSTS, num=5, turns=3, max_new_tokens=8, batch_size=4
    )
    first, second, third = summary["per_turn"]
    assert first["full"]["prompt_tokens"] == first["redacted"]["prompt_tokens"]
    assert first["prompt_saving"] == 0.0 and first["context_saving"] > 0.1
    # True replies give the reference's token counts (until conversation 1 errs, in turn 2).
    assert first["context_saving"] == pytest.approx(first["reference_context_saving"])
    assert second["prompt_saving"] == pytest.approx(second["reference_prompt_saving"])
    assert third["prompt_saving"] > 0.1 and third["context_saving"] > 0.1
    assert second["redacted"]["accuracy"] == 1.0 and second["full"]["accuracy"] == 0.5
    assert third["full"]["accuracy"] == 0.5 and summary["accuracy_drop"] == pytest.approx(-2 / 6)
    assert summary["meets_accuracy_target"]
    assert summary["meets_token_target"] == (third["context_saving"] >= 0.5)
    assert summary["step"] == 7 and summary["samples"][0]["expected"][0] == "17834"


def test_table_files(run, monkeypatch, tmp_path):
    conversations = redaction_eval.build_conversations(FIRSTS, num=1, turns=2, seed=0)
    monkeypatch.setattr(redaction_eval, "complete", scripted_model(conversations))
    summary = redaction_eval.evaluate_redaction(
        run, FIRSTS, num=1, turns=2, max_new_tokens=8, batch_size=4
    )
    json_path, md_path = redaction_eval.write(summary, str(tmp_path))
    with open(json_path) as f:
        assert json.load(f)["per_turn"][1]["turn"] == 2
    with open(md_path) as f:
        table = f.read()
    assert "| 2 |" in table and "100.0%" in table and "+0.0%" in table


def test_no_whole_answer_is_a_clear_error(run):
    with pytest.raises(ValueError, match="whole-number answer"):
        redaction_eval.evaluate_redaction(
            run, [FIRSTS[1]], num=2, turns=3, max_new_tokens=8, batch_size=4
        )
