"""The TFDS builder: deterministic splits, no held-out leakage, corrupted traces, fingerprints."""

from __future__ import annotations

import os

import pytest

from data import builder as builder_lib
from data import format as fmt
from data import tasks
from data.config import default_data_config


def tiny_config():
    """A few dozen records over four families; the other families get weight 0."""
    c = default_data_config()
    for name in c.tasks:
        c.tasks[name].weight = 0.0
    c.tasks.addition.weight = 1.0
    c.tasks.addition.knobs = {"digits": (1, 3)}
    c.tasks.multiplication.weight = 1.0
    c.tasks.multiplication.knobs = {"digits_a": 2, "digits_b": 1}
    c.tasks.letter_count.weight = 1.0
    c.tasks.letter_count.knobs = {"length": (3, 6)}
    c.tasks.sorting.weight = 1.0
    c.train_size, c.validation_size, c.test_size, c.corrupted_size = 32, 8, 8, 12
    return c


def all_records(builder) -> dict[str, list[dict]]:
    """Every decoded record of every split."""
    out = {}
    for split in builder.info.splits:
        source = builder_lib.load_split(builder, split)
        out[split] = [source[i] for i in range(len(source))]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny config, prepared once for the module."""
    builder = builder_lib.make_builder(tiny_config(), str(tmp_path_factory.mktemp("data")))
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def records(built):
    return all_records(built)


def test_splits_and_sizes(records):
    sizes = {split: len(rows) for split, rows in records.items()}
    assert sizes == {
        "train": 32,
        "validation": 8,
        "test": 8,
        "corrupted_train": 12,
        "corrupted_validation": 3,  # corrupted_size scaled by validation_size / train_size
    }
    assert {r["task"] for r in records["train"]} == {
        "addition",
        "multiplication",
        "letter_count",
        "sorting",
    }


def test_same_seed_same_records(records, tmp_path):
    again = builder_lib.make_builder(tiny_config(), str(tmp_path))
    again.download_and_prepare()
    assert all_records(again) == records


def test_held_out_prompts_never_in_train_and_unique_within_splits(records):
    keys = {
        split: [builder_lib.canonical_prompt(r["prompt"]) for r in records[split]]
        for split in builder_lib.SPLITS
    }
    for split, split_keys in keys.items():
        assert len(set(split_keys)) == len(split_keys), split
    assert not set(keys["train"]) & (set(keys["test"]) | set(keys["validation"]))
    assert not set(keys["test"]) & set(keys["validation"])


def test_clean_records_round_trip_and_verify(records):
    for record in records["train"] + records["test"]:
        problem = builder_lib.record_to_problem(record)
        assert builder_lib.problem_to_record(problem) == record
        assert record["first_error_step"] == -1
        assert tasks.get_task(record["task"]).verify(problem, record["visible"]) == 1.0
        parsed = fmt.parse_assistant(record["response"])
        assert not parsed.malformed and parsed.turn.blocks[0].thoughts == problem.steps


def test_corrupted_records_have_a_first_error_and_a_wrong_answer(records):
    clean_prompts = {r["prompt"] for r in records["train"]}
    for record in records["corrupted_train"] + records["corrupted_validation"]:
        problem = builder_lib.record_to_problem(record)
        assert 0 <= record["first_error_step"] < len(record["steps"])
        # `answer` is what the corrupted trace reaches; verifying against meta says it is wrong.
        assert tasks.get_task(record["task"]).verify(problem, record["visible"]) == 0.0
        assert f"Answer: {record['answer']}" in record["response"]
    assert {r["prompt"] for r in records["corrupted_train"]} <= clean_prompts
    traces = [(r["prompt"], tuple(r["steps"])) for r in records["corrupted_train"]]
    assert len(set(traces)) == len(traces)


def test_corrupted_traces_stay_distinct_when_asked_for_many():
    problems = tasks.generate_problems({"addition": {"weight": 1.0, "knobs": {}}}, 3, 0, "train")
    many = builder_lib.corrupt_problems(problems, 10_000, seed=0, stream=0)
    traces = {(p.prompt, p.steps) for p in many}
    assert len(traces) == len(many) < 10_000
    assert all(p.first_error_step >= 0 for p in many)


def test_fingerprint_follows_record_fields_only():
    base = builder_lib.make_builder(tiny_config(), "/nonexistent").builder_config.name
    pipeline_only = tiny_config()
    pipeline_only.seq_len, pipeline_only.pack, pipeline_only.answer_only = 64, False, True
    assert builder_lib.make_builder(pipeline_only, "/nonexistent").builder_config.name == base
    for change in (
        lambda c: setattr(c, "seed", 1),
        lambda c: setattr(c, "train_size", 33),
        lambda c: setattr(c, "corrupted_size", 0),
        lambda c: setattr(c.tasks.addition, "weight", 2.0),
        lambda c: setattr(c.tasks.addition, "knobs", {"digits": 4}),
    ):
        changed = tiny_config()
        change(changed)
        assert builder_lib.make_builder(changed, "/nonexistent").builder_config.name != base


def test_no_corrupted_splits_when_size_is_zero(tmp_path):
    c = tiny_config()
    c.corrupted_size = 0
    builder = builder_lib.make_builder(c, str(tmp_path))
    builder.download_and_prepare()
    assert set(builder.info.splits) == set(builder_lib.SPLITS)


def test_load_split_by_folder(built, records):
    source = builder_lib.load_split(str(built.data_dir), "test")
    assert [source[i] for i in range(len(source))] == records["test"]
    with pytest.raises(ValueError, match="dataset_info.json"):
        builder_lib.load_split(os.path.dirname(built.data_dir), "test")
    with pytest.raises(ValueError, match="split 'nope'"):
        builder_lib.load_split(built, "nope")


def test_bad_configs_are_explained(tmp_path):
    c = tiny_config()
    for name in c.tasks:
        c.tasks[name].weight = 0.0
    with pytest.raises(ValueError, match="data.tasks is empty"):
        builder_lib.make_builder(c, str(tmp_path))
    c = tiny_config()
    c.gsm8k_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="gsm8k_path"):
        builder_lib.make_builder(c, str(tmp_path))
