"""The Grain SFT pipeline: shapes, exact resume, sharding, packing isolation, answer-only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from absl import flags

from data import builder as builder_lib
from data import format as fmt
from data import pipeline
from data.config import default_data_config

BATCH = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small train split (additions and letter counts), decoded."""
    c = default_data_config()
    c.tasks = {
        "addition": {"weight": 1.0, "knobs": {"digits": (1, 3)}},
        "letter_count": {"weight": 1.0, "knobs": {"length": (3, 6)}},
    }
    c.train_size, c.validation_size, c.test_size, c.corrupted_size = 24, 4, 4, 0
    builder = builder_lib.make_builder(c, str(tmp_path_factory.mktemp("data")))
    builder.download_and_prepare()
    return builder_lib.load_split(builder, "train")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    """The shared tiny tokenizer (byte fallback encodes any task text exactly)."""
    return tiny_tokenizer


@pytest.fixture(scope="module")
def seq_len(source, tokenizer):
    """Room for two of the longest examples, so that rows pack several."""
    return 2 * max(example_lengths(source, tokenizer))


@pytest.fixture(scope="module")
def make(source, tokenizer, seq_len):
    """make(**overrides) -> the pipeline over `source` with small defaults."""

    def make_dataset(**overrides):
        kwargs = {"seq_len": seq_len, "batch_size": BATCH, "seed": 0, **overrides}
        return pipeline.make_sft_dataset(source, tokenizer, **kwargs)

    return make_dataset


def example_lengths(source, tokenizer) -> list[int]:
    """Token count of each record's dialogue."""
    return [len(pipeline.encode_record(source[i], tokenizer)["inputs"]) for i in range(len(source))]


def dialogue_text(record: dict, answer_only: bool = False) -> str:
    """The rendered dialogue a record trains on."""
    problem = builder_lib.record_to_problem(record)
    return fmt.render_dialogue(fmt.problem_to_dialogue(problem, answer_only))


def segments(batch: dict) -> list[dict]:
    """Each packed segment's slices of the batch."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        ids = batch["segment_ids"][row]
        for segment in np.unique(ids[ids > 0]):
            out.append({key: value[row][ids == segment] for key, value in batch.items()})
    return out


def segment_texts(batches, tokenizer) -> list[str]:
    """The decoded inputs of every segment, in order."""
    return [tokenizer.decode(s["inputs"]) for b in batches for s in segments(b)]


def test_batch_shapes_and_dtypes(make, seq_len):
    batch = next(iter(make()))
    assert set(batch) == set(pipeline.BATCH_FEATURES)
    for key, value in batch.items():
        assert value.shape == (BATCH, seq_len), key
        want = np.float32 if key in pipeline.TARGET_MASKS else np.int32
        assert value.dtype == want, key


def test_resume_from_state_is_exact(make, source):
    uninterrupted = iter(make(seed=3, prefetch=2))
    # Past one epoch, so the state also covers the reshuffle and the packer's open bins.
    for _ in range(2 * len(source) // BATCH):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # checkpointable as JSON
    expected = [next(uninterrupted) for _ in range(2)]

    resumed = iter(make(seed=3, prefetch=2))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_order(make):
    def first(seed):
        return next(iter(make(seed=seed)))["inputs"]

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_each_epoch_is_reshuffled(make, source, tokenizer):
    order = segment_texts(make(batch_size=1, num_epochs=2, pack=False), tokenizer)
    first, second = order[: len(source)], order[len(source) :]
    assert sorted(first) == sorted(second) and first != second


def test_two_shards_are_disjoint_and_cover_the_split(make, source, tokenizer):
    shards = [
        segment_texts(make(num_epochs=1, shard_index=i, shard_count=2), tokenizer) for i in range(2)
    ]
    everything = sorted(dialogue_text(source[i]) for i in range(len(source)))
    assert sorted(shards[0] + shards[1]) == everything
    assert len(shards[0]) == len(shards[1]) == len(source) // 2


def test_packed_segments_are_whole_isolated_dialogues(make, source, tokenizer):
    batches = list(make(num_epochs=1))  # the default shard: this (only) JAX process
    texts = {dialogue_text(source[i]): source[i] for i in range(len(source))}
    assert max(b["segment_ids"].max() for b in batches) >= 2, "nothing was packed"
    for batch in batches:
        pad = batch["segment_ids"] == 0
        assert not any(batch[key][pad].any() for key in pipeline.TARGET_MASKS)
        for s in segments(batch):
            text = tokenizer.decode(s["inputs"])
            assert text in texts  # a whole dialogue, not a piece of one or of two
            np.testing.assert_array_equal(s["positions"], np.arange(len(s["inputs"])))
            np.testing.assert_array_equal(s["targets"][:-1], s["inputs"][1:])
            assert s["targets"][-1] == tokenizer.pad_id and s["loss_mask"][-1] == 0
            # Step ends sit on the "\n" closing each thought step.
            assert s["step_end_mask"].sum() == len(texts[text]["steps"])
            assert {tokenizer.decode([t]) for t in s["inputs"][s["step_end_mask"] == 1]} <= {"\n"}
    # One epoch holds every example exactly once.
    assert sorted(segment_texts(batches, tokenizer)) == sorted(texts)


def test_masks_select_the_parts_they_name(make, source, tokenizer):
    s = segments(next(iter(make())))[0]
    text = tokenizer.decode(s["inputs"])
    record = next(source[i] for i in range(len(source)) if dialogue_text(source[i]) == text)
    headline = tokenizer.decode(s["targets"][s["headline_mask"] == 1])
    assert headline == fmt.HEADLINE + record["headline"] + "\n"
    assert tokenizer.decode(s["targets"][s["answer_mask"] == 1]) == record["visible"]
    assert tokenizer.decode(s["targets"][s["loss_mask"] == 1]) == record["response"] + fmt.EOT


def test_answer_only_batches_have_no_thinking(make, source, tokenizer):
    marker_ids = [tokenizer.token_id(m) for m in fmt.THINKING_MARKERS]
    answer_only_texts = {dialogue_text(source[i], answer_only=True) for i in range(len(source))}
    batches = list(make(num_epochs=1, answer_only=True))
    for batch in batches:
        assert not np.isin(batch["inputs"], marker_ids).any()
        assert batch["step_end_mask"].sum() == 0 and batch["thoughts_mask"].sum() == 0
    assert sorted(segment_texts(batches, tokenizer)) == sorted(answer_only_texts)


def test_unpacked_rows_hold_one_example(make, source):
    batches = list(make(num_epochs=1, pack=False))
    assert all(b["segment_ids"].max() <= 1 for b in batches)
    # The last batch is filled up with empty rows instead of being dropped.
    assert sum(int((b["segment_ids"][:, 0] == 1).sum()) for b in batches) == len(source)
    assert len(batches) == -(-len(source) // BATCH)


def test_long_examples_are_dropped_and_an_all_dropped_epoch_raises(make, source, tokenizer):
    lengths = sorted(example_lengths(source, tokenizer))
    cut = lengths[len(lengths) // 2]
    kept = [s for b in make(seq_len=cut, num_epochs=1) for s in segments(b)]
    assert len(kept) == sum(n <= cut for n in lengths)
    too_short = lengths[0] - 1
    with pytest.raises(ValueError, match=f"seq_len={too_short} .*longest: {lengths[-1]}"):
        next(iter(make(seq_len=too_short)))


def test_worker_processes_give_the_same_batches(make):
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags, as app.run parses
        flags.FLAGS.mark_as_parsed()
    in_process = list(make(num_epochs=1))
    with_workers = list(make(num_epochs=1, num_workers=1))
    assert len(in_process) == len(with_workers)
    for a, b in zip(in_process, with_workers, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_eval_records(source):
    records = pipeline.make_eval_records(source, n=3)
    assert len(records) == 3 and isinstance(records[0]["meta"], dict)
    assert records[0]["prompt"] == source[0]["prompt"]
    assert len(pipeline.make_eval_records(source)) == len(source)


def test_multiturn_fraction_mixes_redacted_follow_up_dialogues(make, tokenizer, seq_len):
    """About that share of examples become follow-up dialogues, trained on their last turn only."""
    batches = [next(it) for it in [iter(make(seq_len=4 * seq_len, multiturn_fraction=0.5))] * 8]
    found = {"single": 0, "multi": 0}
    for segment in [s for b in batches for s in segments(b)]:
        text = tokenizer.decode(segment["inputs"])
        follow_up = "Now add" in text or "Now multiply" in text
        found["multi" if follow_up else "single"] += 1
        if follow_up:
            # Earlier turns are context: no loss there, and their thoughts are redacted.
            trained = tokenizer.decode(segment["targets"][segment["loss_mask"] > 0])
            assert "Now " not in trained
            assert text.count(fmt.THOUGHTS) == 1
    assert found["multi"] > 0 and found["single"] > 0, found


def test_multiturn_fraction_rejects_bad_values(make):
    """A share outside [0, 1], or multi-turn with answer-only, is a clear error."""
    with pytest.raises(ValueError, match="multiturn_fraction"):
        make(multiturn_fraction=1.5)
    with pytest.raises(ValueError, match="answer_only"):
        make(multiturn_fraction=0.5, answer_only=True)
