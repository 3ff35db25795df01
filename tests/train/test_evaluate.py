"""train.evaluate.evaluate: greedy generation batched one task at a time, scored in input order."""

from __future__ import annotations

import types

import numpy as np

from data import format as fmt
from data.builder import problem_to_record
from data.tasks import generate_problems
from rl.generate import Generation
from train import evaluate as evaluate_lib


class _CharTokenizer:
    """Just enough tokenizer for score_response: one id per character."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_decodes_grouped_by_task_and_scores_in_the_input_order(monkeypatch):
    mix = {
        "addition": {"weight": 1.0, "knobs": {"digits": 2}},
        "letter_count": {"weight": 1.0, "knobs": {}},
    }
    problems = generate_problems(mix, 12, 0, "test")
    assert len({p.task for p in problems[:4]}) == 2  # the draw interleaves the tasks
    by_prompt = {p.prompt: p for p in problems}
    seen_prompts = []

    def fake_generate(params, model_cfg, tokenizer, questions, **kwargs):
        seen_prompts.extend(questions)
        # Correct answers to additions, wrong ones to letter counts.
        return [
            [
                Generation(
                    prompt=q,
                    text=by_prompt[q].response if by_prompt[q].task == "addition" else "Answer: -1",
                    tokens=np.zeros(1, np.int32),
                    logprobs=np.zeros(1, np.float32),
                    finished=True,
                )
            ]
            for q in questions
        ]

    monkeypatch.setattr(evaluate_lib, "generate", fake_generate)
    records = [problem_to_record(p) for p in problems]
    eval_config = types.SimpleNamespace(max_new_tokens=8, batch_size=4)
    result = evaluate_lib.evaluate(None, None, _CharTokenizer(), records, eval_config)

    tasks_seen = [by_prompt[q].task for q in seen_prompts]
    assert tasks_seen == sorted(tasks_seen)  # one task at a time
    assert [row["task"] for row in result["per_problem"]] == [p.task for p in problems]
    correct = [row["correct"] for row in result["per_problem"]]
    assert correct == [float(p.task == "addition") for p in problems]
    assert [s["prompt"] for s in result["samples"]] == [p.prompt for p in problems[:6]]


def test_a_block_without_thoughts_is_not_well_formed():
    (problem,) = generate_problems(
        {"addition": {"weight": 1.0, "knobs": {"digits": 2}}}, 1, 0, "test"
    )
    text = fmt.render_assistant(fmt.problem_to_dialogue(problem, False).turns[-1])
    good = evaluate_lib.score_response(problem, text, _CharTokenizer())
    assert good["correct"] == 1.0 and good["well_formed"] == 1.0 and good["thought_tokens"] > 0
    # The headline running into the steps: no <|thoughts|> marker, the same answer line.
    run_on = text.replace("\n<|thoughts|>", " ", 1)
    assert run_on != text
    bad = evaluate_lib.score_response(problem, run_on, _CharTokenizer())
    assert bad["correct"] == 1.0 and bad["well_formed"] == 0.0 and bad["thought_tokens"] == 0
