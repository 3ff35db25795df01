"""Reward-model data: exact and Monte-Carlo step labels on a toy policy, storage, batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data import format as fmt
from data import tasks
from data.builder import load_split, problem_to_record
from data.rm_builder import check_record, make_rm_builder, make_rm_dataset
from data.tasks.addition import ADDITION
from data.tokenizer import train_tokenizer
from rl import rm_data
from rl.generate import user_prompt_tokens
from rl.reward_model import step_end_positions

WRONG_ENDING = "<|summary|>guess\n<|end_thinking_block|>\nAnswer: 0"


@pytest.fixture(scope="module")
def problems():
    """Clean 3-digit additions (four steps each) and letter counts."""
    mix = {
        "addition": {"weight": 1.0, "knobs": {"digits": 3}},
        "letter_count": {"weight": 1.0, "knobs": {}},
    }
    return tasks.generate_problems(mix, 24, 0, "train")


@pytest.fixture(scope="module")
def tokenizer(problems):
    texts = [fmt.render_dialogue(fmt.problem_to_dialogue(p)) for p in problems]
    return train_tokenizer(texts + [WRONG_ENDING], vocab_size=400)


@pytest.fixture(scope="module")
def addition(problems):
    return next(p for p in problems if p.task == "addition")


def response_of(problem, tokenizer) -> list[int]:
    """The assistant body of the problem's dialogue, closed by <|eot_id|>."""
    turn = fmt.problem_to_dialogue(problem).turns[-1]
    return tokenizer.encode(fmt.render_assistant(turn)) + [tokenizer.eot_id]


def corrupted(problem, step: int):
    return ADDITION.corrupt(problem, step, np.random.default_rng(0))


# ---------------------------------------------------------------------------- exact labels


@pytest.mark.parametrize(
    "num_steps, first_error, correct, finished, labels, mask",
    [
        # Finished responses: the thought steps, then the answer step.
        (4, -1, True, True, [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),
        (4, 1, False, True, [1, 0, 1, 1, 1], [1, 1, 0, 0, 0]),
        (4, 0, True, True, [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]),
        (4, 3, False, True, [1, 1, 1, 0, 1], [1, 1, 1, 1, 0]),
        (4, -1, False, True, [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]),  # steps fine, answer wrong
        (3, 3, True, True, [1, 1, 1, 0], [1, 1, 1, 1]),  # a step missing, the answer lucky
        (3, 3, False, True, [1, 1, 1, 0], [1, 1, 1, 1]),
        (0, 0, True, True, [0], [1]),  # no steps at all
        # Cut off before the answer: no answer step, the last written step takes a wrong one.
        (4, -1, False, False, [1, 1, 1, 0], [1, 1, 1, 1]),
        (4, 2, False, False, [1, 1, 0, 1], [1, 1, 1, 0]),
        (0, -1, False, False, [], []),
    ],
)
def test_process_labels(num_steps, first_error, correct, finished, labels, mask):
    got_labels, got_mask = rm_data.process_labels(num_steps, first_error, correct, finished)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_mask, mask)


def test_response_steps_recover_the_trace(addition, tokenizer):
    response = response_of(addition, tokenizer)
    ends, texts = rm_data.response_steps(response, tokenizer)
    assert texts == list(addition.steps)
    assert [tokenizer.decode([response[e]]) for e in ends] == ["\n"] * len(addition.steps)


def test_label_response_exact(addition, tokenizer):
    prompt = user_prompt_tokens(tokenizer, addition.prompt)
    clean = rm_data.label_response(addition, prompt, response_of(addition, tokenizer), tokenizer)
    assert clean["orm_label"] == 1.0 and clean["source"] == "policy"
    np.testing.assert_array_equal(clean["step_labels"], [1, 1, 1, 1, 1])  # + the answer step
    np.testing.assert_array_equal(clean["step_mask"], [1, 1, 1, 1, 1])
    assert clean["response"] == fmt.render_assistant(fmt.problem_to_dialogue(addition).turns[-1])

    # A sampled response whose second step is wrong, judged against the clean problem.
    bad = rm_data.label_response(
        addition, prompt, response_of(corrupted(addition, 1), tokenizer), tokenizer
    )
    assert bad["orm_label"] == 0.0
    np.testing.assert_array_equal(bad["step_labels"], [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(bad["step_mask"], [1, 1, 0, 0, 0])

    # Every step right, the answer line wrong: the answer step takes the blame.
    blocks = fmt.problem_to_dialogue(addition).turns[-1].blocks
    tokens = tokenizer.encode(fmt.render_assistant(fmt.Turn("assistant", "Answer: 1", blocks)))
    wrong_answer = rm_data.label_response(addition, prompt, tokens + [tokenizer.eot_id], tokenizer)
    assert wrong_answer["orm_label"] == 0.0
    np.testing.assert_array_equal(wrong_answer["step_labels"], [1, 1, 1, 1, 0])
    assert wrong_answer["step_positions"][-1] == len(wrong_answer["tokens"]) - 1  # <|eot_id|>

    # The last step missing, the answer still right: wrong where it turns to the answer.
    last = blocks[-1]
    short = [*blocks[:-1], dataclasses.replace(last, thoughts=last.thoughts[:-1])]
    turn = fmt.Turn("assistant", fmt.problem_to_dialogue(addition).turns[-1].content, short)
    tokens = tokenizer.encode(fmt.render_assistant(turn)) + [tokenizer.eot_id]
    missing = rm_data.label_response(addition, prompt, tokens, tokenizer)
    assert missing["orm_label"] == 1.0
    np.testing.assert_array_equal(missing["step_labels"], [1, 1, 1, 0])
    np.testing.assert_array_equal(missing["step_mask"], [1, 1, 1, 1])


def test_label_response_never_raises_on_garbage(addition, tokenizer):
    prompt = user_prompt_tokens(tokenizer, addition.prompt)
    garbage = tokenizer.encode("<|thoughts|>7+2\n<|thoughts|><|summary|>\n\n<|eot_id|>x\n")
    record = rm_data.label_response(addition, prompt, garbage, tokenizer)
    assert record["orm_label"] == 0.0
    assert len(record["step_labels"]) == len(record["step_positions"]) == 1
    np.testing.assert_array_equal(record["step_labels"], [0])  # "7+2" is not the first step


def test_trace_records_label_from_the_known_first_error(addition, tokenizer):
    bad = rm_data.trace_record(corrupted(addition, 2), tokenizer, "corrupted")
    clean = rm_data.trace_record(addition, tokenizer, "clean")
    assert (bad["orm_label"], clean["orm_label"]) == (0.0, 1.0)
    np.testing.assert_array_equal(bad["step_labels"], [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(bad["step_mask"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(clean["step_labels"], [1, 1, 1, 1, 1])
    # Positions index the full tokens: encode_dialogue's step ends, then the closing
    # <|eot_id|> (the answer step).
    encoded = fmt.encode_dialogue(fmt.problem_to_dialogue(addition), tokenizer)
    np.testing.assert_array_equal(clean["tokens"], encoded.tokens)
    np.testing.assert_array_equal(
        clean["step_positions"], [*np.flatnonzero(encoded.step_end), len(encoded.tokens) - 1]
    )
    assert clean["tokens"][-1] == tokenizer.eot_id


def test_corrupted_pairs_find_the_clean_trace(problems, addition, tokenizer):
    split = [problem_to_record(p) for p in problems]
    records = rm_data.corrupted_pairs([corrupted(addition, 0)], split, tokenizer)
    assert [r["source"] for r in records] == ["corrupted", "clean"]
    assert records[1]["response"] == fmt.render_assistant(
        fmt.problem_to_dialogue(addition).turns[-1]
    )


# ---------------------------------------------------------------------------- Monte Carlo


class ToyPolicy:
    """Samples the given responses at the prompt; from a step end, rollout j reaches the right
    answer iff j < rollouts - (steps so far), so the success rate falls by 1/rollouts a step."""

    def __init__(self, problem, responses, tokenizer):
        self.prompt = user_prompt_tokens(tokenizer, problem.prompt)
        self.responses, self.tokenizer = responses, tokenizer
        self.right = response_of(problem, tokenizer)
        self.wrong = tokenizer.encode(WRONG_ENDING) + [tokenizer.eot_id]
        self.calls = []

    def __call__(self, prompts, num_samples, max_new_tokens, stream):
        self.calls.append([list(p) for p in prompts])
        out = []
        for prefix in prompts:
            if list(prefix) == self.prompt:
                out.append([np.asarray(r) for r in self.responses[:num_samples]])
                continue
            done = len(step_end_positions(prefix[len(self.prompt) :], self.tokenizer))
            # The rest of the clean response ends with the right answer line.
            rest = self.right[len(prefix) - len(self.prompt) :]
            out.append([rest if j < num_samples - done else self.wrong for j in range(num_samples)])
        return out


class RmConfig:
    def __init__(self, label_source):
        self.label_source, self.samples_per_problem = label_source, 2
        self.max_new_tokens, self.mc_rollouts = 64, 4


@pytest.mark.parametrize(
    "source, labels, values, mask",
    [
        # clean sample: MC rates .75 .5 .25 0, answer step 1 (its outcome); corrupted sample
        # (error at step 1): exact 1 0 - - -, answer step 0
        ("mc", [[1, 1, 1, 0, 1], [1, 1, 1, 0, 0]],
         [[0.75, 0.5, 0.25, 0, 1], [0.75, 0.5, 0.25, 0, 0]],
         [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),
        ("both", [[1, 1, 1, 0, 1], [1, 0, 1, 0, 0]],
         [[0.75, 0.5, 0.25, 0, 1], [0.75, 0, 0.25, 0, 0]],
         [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
        ("exact", [[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]], [[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]],
         [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
    ],
)  # fmt: skip
def test_policy_records_mc_labels_on_a_toy_policy(
    addition, tokenizer, source, labels, values, mask
):
    responses = [response_of(addition, tokenizer), response_of(corrupted(addition, 1), tokenizer)]
    policy = ToyPolicy(addition, responses, tokenizer)
    records = rm_data.policy_records(
        [addition], policy, tokenizer, RmConfig(source), max_len=1024, stream=0
    )
    assert [r["orm_label"] for r in records] == [1.0, 0.0]
    for i, record in enumerate(records):
        np.testing.assert_allclose(record["step_labels"], labels[i])
        np.testing.assert_allclose(record["step_values"], values[i])
        np.testing.assert_allclose(record["step_mask"], mask[i])
    if source == "exact":
        assert len(policy.calls) == 1  # no rollouts
        return
    # All 8 step prefixes went to the sampler in one batched call, each cut after a "\n".
    assert len(policy.calls) == 2 and len(policy.calls[1]) == 8
    assert all(tokenizer.decode(prefix[-1:]) == "\n" for prefix in policy.calls[1])


def test_mc_skips_prefixes_that_do_not_fit(addition, tokenizer):
    policy = ToyPolicy(addition, [response_of(addition, tokenizer)], tokenizer)
    record = rm_data.label_response(
        addition, policy.prompt, response_of(addition, tokenizer), tokenizer
    )
    ends = record["step_positions"]
    max_len = int(ends[1]) + 1 + 64  # room after the second step end, not after the third
    (values,) = rm_data.mc_step_values(
        [addition], [record], policy, tokenizer, rollouts=4, max_new_tokens=64,
        max_len=max_len, stream=1,
    )  # fmt: skip
    # The answer step needs no rollout: its value is the response's outcome.
    np.testing.assert_allclose(values, [0.75, 0.5, np.nan, np.nan, 1.0])
    labels, _, mask = rm_data.combine_labels(
        record["step_labels"], record["step_mask"], values, "mc"
    )
    np.testing.assert_array_equal(mask, [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(labels[:2], [1, 1])


# ---------------------------------------------------------------------------- storage, batches


@pytest.fixture(scope="module")
def stored(tmp_path_factory, problems, addition, tokenizer):
    """Records of every addition and letter count (clean, corrupted, sampled) in a TFDS folder."""
    records = []
    for p in problems[:6]:
        prompt = user_prompt_tokens(tokenizer, p.prompt)
        records.append(rm_data.trace_record(p, tokenizer, "clean"))
        records.append(rm_data.label_response(p, prompt, response_of(p, tokenizer)[:-9], tokenizer))
    records.append(rm_data.trace_record(corrupted(addition, 1), tokenizer, "corrupted"))
    folder = str(tmp_path_factory.mktemp("rm_data"))
    builder = make_rm_builder({"test": 1}, folder, lambda: {"train": records})
    builder.download_and_prepare()
    return records, folder


def test_inconsistent_records_are_refused(stored):
    record = stored[0][0]
    check_record(record)
    for change, message in [
        ({"step_mask": record["step_mask"][:-1]}, "lengths"),
        ({"step_positions": record["step_positions"] - record["prompt_length"]}, "outside"),
        ({"prompt_length": 0}, "prompt_length"),
        ({"source": "human"}, "source"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_record({**record, **change})


def test_builder_round_trip_and_missing_data(stored):
    records, folder = stored
    source = load_split(make_rm_builder({"test": 1}, folder), "train")
    assert len(source) == len(records)
    for i in (0, 1, len(records) - 1):
        assert source[i]["tokens"] == list(records[i]["tokens"])
        assert source[i]["source"] == records[i]["source"]
        np.testing.assert_allclose(source[i]["step_labels"], records[i]["step_labels"])
    with pytest.raises(ValueError, match="not built"):
        make_rm_builder({"test": 2}, folder).download_and_prepare()


def test_batches_put_targets_on_the_right_tokens(stored, tokenizer):
    records, folder = stored
    source = load_split(make_rm_builder({"test": 1}, folder), "train")
    dataset = make_rm_dataset(
        source, seq_len=512, batch_size=2, pad_id=tokenizer.pad_id, seed=0, shuffle=False,
        num_epochs=1, shard_index=0, shard_count=1,
    )  # fmt: skip
    batches = list(dataset)
    assert all(b["inputs"].shape == (2, 512) for b in batches)
    seen_steps, seen_orm, segments = [], [], 0
    for batch in batches:
        for row in range(2):
            tokens, seg = batch["inputs"][row], batch["segment_ids"][row]
            for s in np.unique(seg[seg > 0]):
                segments += 1
                where = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(batch["positions"][row, where], np.arange(where.size))
                # The ORM target sits on the segment's last token, and only there.
                orm = np.flatnonzero(batch["orm_mask"][row, where])
                assert orm.tolist() == [where.size - 1]
                seen_orm.append(float(batch["orm_target"][row, where[-1]]))
                # Step targets sit on thought step ends, and on the <|eot_id|> of a finished
                # response (its answer step), which is then also the segment's last token.
                ends = where[batch["step_end_mask"][row, where] > 0]
                assert all(tokenizer.decode([tokens[e]]) == "\n" for e in ends[:-1])
                assert tokens[ends[-1]] == tokenizer.eot_id or (
                    tokenizer.decode([tokens[ends[-1]]]) == "\n"
                )
                assert tokens[ends[-1]] != tokenizer.eot_id or ends[-1] == where[-1]
                seen_steps.append(batch["step_target"][row, ends].tolist())
                # The loss mask covers the response, which starts after the assistant header.
                first = where[np.argmax(batch["loss_mask"][row, where] > 0)]
                assert tokenizer.decode(tokens[first - 2 : first]) == "\n\n"
    assert segments == len(records)
    expected_steps = [
        np.asarray(r["step_labels"])[np.asarray(r["step_mask"]) > 0].tolist() for r in records
    ]
    assert sorted(seen_steps) == sorted(expected_steps)
    assert sorted(seen_orm) == sorted(float(r["orm_label"]) for r in records)


def test_dataset_drops_records_that_do_not_fit(stored, tokenizer):
    records, folder = stored
    source = load_split(make_rm_builder({"test": 1}, folder), "train")
    shortest = min(len(r["tokens"]) for r in records)
    with pytest.raises(ValueError, match="raise data.seq_len"):
        make_rm_dataset(source, seq_len=shortest - 1, batch_size=2, pad_id=0, seed=0)
    dataset = make_rm_dataset(
        source, seq_len=shortest, batch_size=1, pad_id=0, seed=0, num_epochs=1,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    lengths = [int((b["segment_ids"] > 0).sum()) for b in dataset]
    assert lengths == [shortest] * sum(len(r["tokens"]) == shortest for r in records)


def test_iterator_resumes_at_the_next_batch(stored, tokenizer):
    _, folder = stored
    source = load_split(make_rm_builder({"test": 1}, folder), "train")
    make = lambda: iter(  # noqa: E731
        make_rm_dataset(source, seq_len=512, batch_size=2, pad_id=0, seed=3, shard_index=0,
                        shard_count=1)
    )  # fmt: skip
    first = make()
    next(first)
    state = first.get_state()
    expected = next(first)
    second = make()
    second.set_state(state)
    np.testing.assert_array_equal(next(second)["inputs"], expected["inputs"])
