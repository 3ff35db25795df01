"""Tests for the task suite: prompts, traces, verifiers, corruption and the problem mixer."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest

from data.tasks import TASKS, generate_problems, get_task, task_counts
from data.tasks.addition import ADDITION
from data.tasks.answer import extract_answer, parse_int, parse_int_list
from data.tasks.arithmetic import ARITHMETIC, evaluate, parse, render, tokens_of
from data.tasks.letter_count import LETTER_COUNT, word_pools, word_split
from data.tasks.multiplication import MULTIPLICATION
from data.tasks.program_specs import SPECS
from data.tasks.program_trace import source
from data.tasks.program_write import PROGRAM_WRITE, extract_code, passes_in_process
from data.tasks.sorting import SORTING

FAMILIES = sorted(TASKS)
SEEDS = range(25)
GARBAGE = [
    "",
    "Answer:",
    "no answer line at all",
    "Answer: " + "9" * 5000,
    "Answer: 1e999999",
    "Answer: ∞ ✓ ダメ \x00\udcff",
    "Answer: [1, 2",
    "```python\nwhile True: pass\n```",
    None,
    12345,
    b"Answer: 3",
]


def problems(name: str, seeds=SEEDS):
    """Problems of one family, one per seed."""
    return [get_task(name).generate(np.random.default_rng(seed)) for seed in seeds]


# --- the Answer: line ---------------------------------------------------------------------


def test_extract_answer_reads_the_last_answer_line():
    assert extract_answer("x\nAnswer: 1\nmore\nAnswer:  5758. \n") == "5758"
    assert extract_answer("  Answer: -3") == "-3"
    assert extract_answer("answer: 3") is None
    assert extract_answer("The Answer: 3") is None
    assert extract_answer(None) is None
    assert parse_int("5,758") == 5758 and parse_int("-12") == -12
    assert parse_int("5,75") is None and parse_int("1" * 300) is None and parse_int("3.0") is None
    assert parse_int_list("[3, 7,19  42]") == [3, 7, 19, 42]
    assert parse_int_list("3, seven") is None and parse_int_list("") is None


# --- registry and canonical prompts -------------------------------------------------------


def test_registry_lists_every_family():
    assert set(TASKS) == {
        "addition",
        "multiplication",
        "letter_count",
        "arithmetic",
        "sorting",
        "program_trace",
        "program_write",
    }
    with pytest.raises(KeyError, match="known tasks:.*addition"):
        get_task("subtraction")


def test_canonical_prompts():
    addition = ADDITION.build({"a": 4821, "b": 937})
    assert addition.prompt == "What is 4821 + 937?"
    assert addition.headline == "How to add 4821 and 937"
    assert addition.answer == "5758"
    assert MULTIPLICATION.build({"a": 482, "b": 37}).prompt == "What is 482 * 37?"
    letters = LETTER_COUNT.build({"word": "strawberry", "letter": "r"})
    assert letters.prompt == 'How many times does the letter "r" appear in "strawberry"?'
    assert letters.answer == "3"
    assert letters.steps[:3] == ("s≠r 0", "t≠r 0", "r=r 1")
    sort = SORTING.build({"values": [42, 7, 19, 3]})
    assert sort.prompt == "Sort these numbers from smallest to largest: 42, 7, 19, 3."
    assert sort.answer == "3, 7, 19, 42"
    expression = ["-", ["*", ["+", 7, 5], 3], 4]
    arithmetic = ARITHMETIC.build({"expression": expression})
    assert arithmetic.prompt == "What is (7 + 5) * 3 - 4?"
    assert arithmetic.steps == (
        "7 + 5 = 12, so 12 * 3 - 4",
        "12 * 3 = 36, so 36 - 4",
        "36 - 4 = 32, so 32",
    )
    assert problems("program_trace", [0])[0].prompt.startswith("What does this program print?\n")
    assert problems("program_write", [0])[0].prompt.startswith("Write a Python function `")


def test_worked_traces_read_as_documented():
    assert ADDITION.build({"a": 4821, "b": 937}).steps == (
        "1+7+0=8",
        "2+3+0=5",
        "8+9+0=17",
        "4+0+1=5",
        "4821+937=5758",
    )
    steps = MULTIPLICATION.build({"a": 482, "b": 37}).steps
    assert steps[:4] == (
        "2*7+0=14+0=14",
        "8*7+1=56+1=57",
        "4*7+5=28+5=33",
        "482*7=3374",
    )
    assert steps[7] == "482*30=14460" and steps[-1] == "3374+14460=17834"
    assert SORTING.build({"values": [42, 7, 19, 3]}).steps == (
        "take 3; left 42, 7, 19",
        "take 7; left 42, 19",
        "take 19; left 42",
        "take 42; left none",
        "sorted 3, 7, 19, 42",
    )


# --- shape, determinism and knobs ---------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_problems_are_well_formed_and_deterministic(name):
    family = get_task(name)
    for seed in range(10):
        problem = family.generate(np.random.default_rng(seed))
        assert problem == family.generate(np.random.default_rng(seed))
        assert problem.task == name and problem.first_error_step == -1
        assert problem.steps and all(step and "\n" not in step for step in problem.steps)
        assert "\n" not in problem.headline and "\n" not in problem.summary
        assert problem.response.splitlines()[-1] == f"Answer: {problem.answer}"
        assert json.loads(json.dumps(problem.meta)) == problem.meta
        assert family.check_steps(problem, problem.steps) == -1
    prompts = {p.prompt for p in problems(name, range(10))}
    assert len(prompts) >= 5


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_and_bad_knobs_are_named(name):
    family = get_task(name)
    with pytest.raises(TypeError, match="difficulty"):
        family.generate(np.random.default_rng(0), difficulty=3)
    with pytest.raises(ValueError, match="split"):
        family.generate(np.random.default_rng(0), split="dev")


def test_range_knobs_are_respected():
    rng = np.random.default_rng(0)
    for _ in range(20):
        meta = ADDITION.generate(rng, digits=(3, 5)).meta
        assert all(3 <= len(str(meta[key])) <= 5 for key in ("a", "b"))
        meta = MULTIPLICATION.generate(rng, digits_a=4, digits_b=1).meta
        assert len(str(meta["a"])) == 4 and len(str(meta["b"])) == 1
        assert len(LETTER_COUNT.generate(rng, length=(5, 6)).meta["word"]) in (5, 6)
        assert len(SORTING.generate(rng, count=7, max_value=9).meta["values"]) == 7
        expression = ARITHMETIC.generate(rng, ops=3, max_operand=5).meta["expression"]
        assert sum(t in "+-*" for t in tokens_of(expression) if isinstance(t, str)) == 3
    with pytest.raises(ValueError, match="digits"):
        ADDITION.generate(rng, digits=(4, 2))
    with pytest.raises(ValueError, match="digits_b"):
        MULTIPLICATION.generate(rng, digits_b="two")
    with pytest.raises(ValueError, match="present_prob"):
        LETTER_COUNT.generate(rng, present_prob=2.0)
    with pytest.raises(ValueError, match="spec"):
        PROGRAM_WRITE.generate(rng, spec="quicksort")


# --- verify -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "program_write"])
def test_verify_accepts_reference_and_rejects_wrong_or_garbage(name):
    family = get_task(name)
    for problem in problems(name, range(8)):
        assert family.verify(problem, problem.response) == 1.0
        assert family.verify(problem, f"Sure.\nAnswer: {problem.answer}.") == 1.0
        wrong = family.corrupt(problem, len(problem.steps) - 1, np.random.default_rng(0))
        assert family.verify(problem, wrong.response) == 0.0
        assert family.verify(problem, problem.response + "\nAnswer: 1234567") == 0.0
        for garbage in GARBAGE:
            assert family.verify(problem, garbage) == 0.0


def test_verify_normalizes_numbers_and_lists():
    addition = ADDITION.build({"a": 4821, "b": 937})
    assert ADDITION.verify(addition, "Answer: 5,758") == 1.0
    assert ADDITION.verify(addition, "Answer: 5758.0") == 0.0
    sort = SORTING.build({"values": [42, 7, 19, 3]})
    assert SORTING.verify(sort, "Answer: 3,7,19,42") == 1.0
    assert SORTING.verify(sort, "Answer: [3, 7, 19, 42]") == 1.0
    assert SORTING.verify(sort, "Answer: 3, 7, 42, 19") == 0.0
    assert SORTING.verify(sort, "Answer: 3, 7, 19") == 0.0


def test_program_write_verify_runs_hidden_tests_in_sandbox():
    problem = PROGRAM_WRITE.generate(np.random.default_rng(0), spec="count_greater")
    assert PROGRAM_WRITE.verify(problem, problem.response) == 1.0
    wrong_name = problem.response.replace("Answer: count_greater", "Answer: count")
    assert PROGRAM_WRITE.verify(problem, wrong_name) == 0.0
    cheat = "```python\ndef count_greater(xs):\n    return 0\n```\nAnswer: count_greater"
    assert PROGRAM_WRITE.verify(problem, cheat) == 0.0
    buggy = PROGRAM_WRITE.corrupt(problem, 3, np.random.default_rng(0))
    assert buggy.answer == problem.answer and buggy.response != problem.response
    assert PROGRAM_WRITE.verify(problem, buggy.response) == 0.0
    for garbage in GARBAGE:
        assert PROGRAM_WRITE.verify(problem, garbage) == 0.0
    assert extract_code("a\n```py\nx = 1\n```\nb\n```\ny = 2\n```") == "y = 2\n"
    assert extract_code("no code") is None


def test_program_write_reference_code_passes_its_hidden_tests():
    rng = np.random.default_rng(0)
    for spec in SPECS:
        for _ in range(5):
            problem = PROGRAM_WRITE.generate(rng, spec=spec.name)
            assert passes_in_process(extract_code(problem.response), problem.meta["tests"])


# --- corrupt and check_steps --------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_corrupt_first_error_is_found_by_check_steps(name):
    family = get_task(name)
    for seed, problem in zip(SEEDS, problems(name), strict=True):
        rng = np.random.default_rng(seed)
        for step in range(len(problem.steps)):
            bad = family.corrupt(problem, step, rng)
            assert bad.first_error_step == step
            assert (
                bad.steps[:step] == problem.steps[:step] and bad.steps[step] != problem.steps[step]
            )
            assert family.check_steps(problem, bad.steps) == step
            assert family.check_steps(bad, bad.steps) == step  # meta keeps the truth
            assert bad.response.splitlines()[-1] == f"Answer: {bad.answer}"
            if name != "program_write":  # its answer is the function name; the code is wrong
                assert bad.answer != problem.answer
                assert family.verify(problem, bad.response) == 0.0
            else:
                assert not passes_in_process(extract_code(bad.response), problem.meta["tests"])
    with pytest.raises(ValueError, match="step"):
        family.corrupt(problem, len(problem.steps), rng)


@pytest.mark.parametrize("name", FAMILIES)
def test_check_steps_handles_short_long_spaced_and_garbage_traces(name):
    family = get_task(name)
    problem = problems(name, [3])[0]
    steps = problem.steps
    assert family.check_steps(problem, steps[:-1]) == len(steps) - 1
    assert family.check_steps(problem, ()) == 0
    assert family.check_steps(problem, (*steps, "extra")) == len(steps)
    assert (
        family.check_steps(problem, tuple("  " + s.replace(" ", "  ") + " " for s in steps)) == -1
    )
    assert family.check_steps(problem, (steps[0], None, *steps[2:])) == 1
    assert family.check_steps(problem, ("∞ ✓\udcff", *steps[1:])) == 0
    assert family.check_steps(problem, None) == 0
    assert family.check_steps(problem, 42) == 0


# --- traces are self-consistent -----------------------------------------------------------

COLUMN = re.compile(r"(\d)\+(\d)\+(\d)=(\d+)")
DIGIT = re.compile(r"(\d)\*(\d)\+(\d+)=(\d+)\+(\d+)=(\d+)")


def check_column_chain(lines: list[str], start: int) -> None:
    """Every column line after `start` adds up and carries the tens of the line above."""
    for index, line in enumerate(lines):
        x, y, c, s = map(int, COLUMN.fullmatch(line).groups())
        if index >= start:
            assert x + y + c == s
            if index > 0:
                assert c == int(COLUMN.fullmatch(lines[index - 1]).group(4)) // 10


def test_addition_traces_recompute():
    for seed in range(40):
        problem = ADDITION.generate(np.random.default_rng(seed), digits=(1, 6))
        a, b = problem.meta["a"], problem.meta["b"]
        columns = list(problem.steps[:-1])
        check_column_chain(columns, 0)
        tops = [int(COLUMN.fullmatch(line).group(1)) for line in columns]
        assert sum(d * 10**i for i, d in enumerate(tops)) == a
        assert problem.steps[-1] == f"{a}+{b}={a + b}"
        for step in range(len(columns)):  # after the error, the arithmetic is right again
            bad = ADDITION.corrupt(problem, step, np.random.default_rng(seed))
            check_column_chain(list(bad.steps[:-1]), step + 1)
            sums = [int(COLUMN.fullmatch(line).group(4)) for line in bad.steps[:-1]]
            value = sum(total % 10 * 10**i for i, total in enumerate(sums))
            assert int(bad.answer) == value + sums[-1] // 10 * 10 ** len(sums)


def test_multiplication_traces_recompute():
    for seed in range(20):
        problem = MULTIPLICATION.generate(
            np.random.default_rng(seed), digits_a=(1, 4), digits_b=(1, 3)
        )
        a = problem.meta["a"]
        rows = [line for line in problem.steps if DIGIT.fullmatch(line)]
        assert len(rows) == len(str(a)) * len(str(problem.meta["b"]))
        for line in rows:
            x, d, c, t, c_again, p = map(int, DIGIT.fullmatch(line).groups())
            assert x * d == t and c_again == c and t + c == p
        above = None  # each step carries the tens of the step above; a row starts at 0
        for line in problem.steps:
            match = DIGIT.fullmatch(line) or COLUMN.fullmatch(line)
            if match:
                assert int(match.group(3)) == (int(above.groups()[-1]) // 10 if above else 0)
            above = match
        for line in problem.steps:
            if "=" in line:  # every step, partial products and running sums included
                *lhs, rhs = line.split("=")
                assert all(eval(expression) == int(rhs) for expression in lhs)
        assert int(problem.answer) == a * problem.meta["b"]


def test_letter_count_trace_spells_word_and_counts():
    for problem in problems("letter_count"):
        word, letter = problem.meta["word"], problem.meta["letter"]
        lines = [re.fullmatch(r"([a-z])([=≠])([a-z]) (\d+)", step) for step in problem.steps]
        assert "".join(line.group(1) for line in lines) == word
        assert all(line.group(3) == letter for line in lines)
        assert [line.group(2) == "=" for line in lines] == [char == letter for char in word]
        counts = [int(line.group(4)) for line in lines]
        assert counts == [word[: i + 1].count(letter) for i in range(len(word))]


def test_letter_count_splits_are_disjoint_english_words():
    from english_words import get_english_words_set

    english = get_english_words_set(["web2"], lower=True, alpha=True)
    pools = {split: set().union(*by_length.values()) for split, by_length in word_pools().items()}
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["validation"]
    assert not pools["test"] & pools["validation"]
    assert set().union(*pools.values()) == english
    assert 0.08 < len(pools["test"]) / len(english) < 0.12
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        words = {LETTER_COUNT.generate(rng, split=split).meta["word"] for _ in range(30)}
        assert words <= pools[split] and all(word_split(w) == split for w in words)
    answers = [int(p.answer) for p in problems("letter_count", range(60))]
    assert sum(a > 0 for a in answers) > 30 and max(answers) >= 2


def test_arithmetic_text_parses_back_and_steps_reduce():
    for seed in range(60):
        problem = ARITHMETIC.generate(np.random.default_rng(seed), ops=(1, 6))
        tree = problem.meta["expression"]
        assert parse(tokens_of(tree)) == tree
        assert eval(render(tree)) == evaluate(tree) == int(problem.answer)
        previous = render(tree)
        for step in problem.steps:
            reduction, rewritten = step.split(", so ")
            lhs, value = reduction.rsplit(" = ", 1)
            assert eval(lhs) == int(value) and eval(rewritten) == eval(previous)
            previous = rewritten
        bad = ARITHMETIC.corrupt(problem, 0, np.random.default_rng(seed))
        rewritten = [step.split(", so ")[1] for step in bad.steps]
        assert all(eval(x) == eval(y) for x, y in zip(rewritten, rewritten[1:], strict=False))


def test_sorting_trace_takes_the_minimum_of_what_is_left():
    for problem in problems("sorting"):
        left = list(problem.meta["values"])
        for step in problem.steps[:-1]:
            take, rest = re.fullmatch(r"take (\d+); left (.*)", step).groups()
            assert int(take) == min(left)
            left.remove(int(take))
            assert rest == (", ".join(map(str, left)) or "none")
        assert problem.steps[-1] == f"sorted {problem.answer}"


def test_program_trace_matches_real_python():
    for problem in problems("program_trace", range(40)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(source(problem.meta["program"]), {})  # our own generated program
        assert out.getvalue().strip() == problem.answer
        assert problem.prompt.endswith(source(problem.meta["program"]))


# --- the mixer ----------------------------------------------------------------------------


def test_task_counts_are_exact_and_proportional():
    assert task_counts({"addition": 1, "sorting": 2}, 10) == {"addition": 3, "sorting": 7}
    assert task_counts({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    assert task_counts({"a": 0, "b": 5}, 4) == {"a": 0, "b": 4}
    with pytest.raises(ValueError, match="weight"):
        task_counts({"a": -1}, 3)
    with pytest.raises(ValueError, match="all be 0"):
        task_counts({"a": 0}, 3)


def test_generate_problems_mixes_deterministically():
    mix = {
        "addition": {"weight": 1.0, "knobs": {"digits": 2}},
        "letter_count": {"weight": 2.0},
        "program_write": {"weight": 1.0},
    }
    batch = generate_problems(mix, 12, seed=7, split="test")
    assert [p.task for p in batch].count("letter_count") == 6
    assert [p.task for p in batch].count("addition") == 3
    assert all(len(str(p.meta["a"])) == 2 for p in batch if p.task == "addition")
    assert all(word_split(p.meta["word"]) == "test" for p in batch if p.task == "letter_count")
    assert batch == generate_problems(mix, 12, seed=7, split="test")
    assert batch != generate_problems(mix, 12, seed=8, split="test")
    assert batch != generate_problems(mix, 12, seed=7, split="train")
    only_addition = generate_problems({"addition": mix["addition"]}, 3, seed=7, split="test")
    assert sorted(p.prompt for p in only_addition) == sorted(
        p.prompt for p in batch if p.task == "addition"
    )
    with pytest.raises(KeyError, match="known tasks"):
        generate_problems({"chess": {"weight": 1}}, 2, seed=0, split="train")
    with pytest.raises(ValueError, match="weight"):
        generate_problems({"addition": {"knobs": {}}}, 2, seed=0, split="train")
    with pytest.raises(ValueError, match="split"):
        generate_problems({"addition": {"weight": 1, "knobs": {"split": "test"}}}, 2, 0, "train")
    with pytest.raises(TypeError, match="digitz"):
        generate_problems({"addition": {"weight": 1, "knobs": {"digitz": 2}}}, 2, 0, "train")
