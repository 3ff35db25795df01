"""GSM8K JSONL loading and verification."""

from __future__ import annotations

import json

import pytest

from data import builder as builder_lib
from data import format as fmt
from data.gsm8k import load_gsm8k, parse_gsm8k_line, verify_gsm8k

GOOD = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A  farm has 400 cows and   buys 600 more. How many cows now?",
        "answer": "It has 400+600 = <<400+600=1000>>1000 cows.\n\n#### 1,000",
    },
]


def write_jsonl(path, rows: list) -> str:
    """Writes rows (dicts, or raw strings taken as lines) to a JSONL file."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_load_parses_steps_answer_and_prompt(tmp_path):
    problems = load_gsm8k(write_jsonl(tmp_path / "g.jsonl", GOOD))
    assert [p.answer for p in problems] == ["72", "1000"]
    assert problems[0].steps == (
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    )
    assert problems[1].steps == ("It has 400+600 = 1000 cows.",)
    assert problems[1].prompt == "A farm has 400 cows and buys 600 more. How many cows now?"
    assert all(p.task == "gsm8k" and p.first_error_step == -1 for p in problems)
    assert problems[0].response.splitlines()[-1] == "Answer: 72"


def test_problems_render_and_verify_their_own_response(tmp_path):
    for problem in load_gsm8k(write_jsonl(tmp_path / "g.jsonl", GOOD)):
        turn = fmt.problem_to_dialogue(problem).turns[-1]
        parsed = fmt.parse_assistant(fmt.render_assistant(turn))
        assert not parsed.malformed, parsed.problems
        assert verify_gsm8k(problem, problem.response) == 1.0


def test_malformed_line_names_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [GOOD[0], "{not json", GOOD[1]])
    with pytest.raises(ValueError, match=r"g\.jsonl:2: not valid JSON"):
        load_gsm8k(path)
    assert [p.answer for p in load_gsm8k(path, strict=False)] == ["72", "1000"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('["a list"]', "JSON object"),
        ('{"answer": "#### 3"}', "question"),
        ('{"question": "Q?", "answer": "no marker 3"}', "####"),
        ('{"question": "Q?", "answer": "#### three"}', "not a number"),
    ],
)
def test_each_malformation_is_explained(line, reason):
    with pytest.raises(ValueError, match=reason):
        parse_gsm8k_line(line)


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("So 1000.\nAnswer: 1000", 1.0),
        ("Answer: 1,000", 1.0),
        ("Answer: 1000.00", 1.0),
        ("Answer: $1000.", 1.0),
        ("Answer: 999", 0.0),
        ("The answer is 1000.", 0.0),
        ("Answer: NaN", 0.0),
        ("Answer: sNaN", 0.0),
        ("Answer: " + "9" * 5000, 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_verify_is_numeric_and_never_raises(tmp_path, response, score):
    problem = load_gsm8k(write_jsonl(tmp_path / "g.jsonl", GOOD))[1]
    assert verify_gsm8k(problem, response) == score


def test_gsm8k_joins_train_only_and_changes_the_fingerprint(tmp_path):
    data_config = {
        "tasks": {"addition": {"weight": 1.0, "knobs": {"digits": 2}}},
        "train_size": 6,
        "validation_size": 2,
        "test_size": 2,
        "corrupted_size": 0,
        "seed": 0,
        "gsm8k_path": write_jsonl(tmp_path / "g.jsonl", GOOD),
    }
    builder = builder_lib.make_builder(data_config, str(tmp_path / "data"))
    builder.download_and_prepare()
    tasks_in = {
        split: [builder_lib.load_split(builder, split)[i]["task"] for i in range(n)]
        for split, n in (("train", 8), ("validation", 2), ("test", 2))
    }
    assert tasks_in["train"].count("gsm8k") == 2
    assert "gsm8k" not in tasks_in["validation"] + tasks_in["test"]
    write_jsonl(tmp_path / "g.jsonl", GOOD[:1])
    changed = builder_lib.make_builder(data_config, str(tmp_path / "data"))
    assert changed.builder_config.name != builder.builder_config.name
