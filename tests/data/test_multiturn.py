"""Follow-up conversations: true answers chain, earlier turns redacted, loss on the last turn."""

from __future__ import annotations

import numpy as np
import pytest

from data import multiturn
from data.builder import problem_to_record
from data.format import THOUGHTS, render_dialogue
from data.pipeline import encode_record
from data.tasks.addition import ADDITION
from data.tasks.letter_count import LETTER_COUNT
from data.tasks.sorting import SORTING
from data.tokenizer import train_tokenizer

FIRST = ADDITION.build({"a": 482, "b": 37})


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    dialogues = [
        multiturn.conversation_dialogue(multiturn.conversation(FIRST, rng, 3), redact=False)
        for _ in range(8)
    ]
    return train_tokenizer([render_dialogue(d) for d in dialogues], 400)


def test_follow_ups_work_on_the_previous_true_answer():
    add = multiturn.follow_up(519, "add", 17)
    assert add.prompt == "Now add 17 to that." and add.answer == "536"
    assert add.steps[-1] == "519+17=536"
    times = multiturn.follow_up(536, "multiply", 3)
    assert times.prompt == "Now multiply that by 3." and times.answer == "1608"
    assert ADDITION.verify(add, "Answer: 536") == 1.0 and ADDITION.verify(add, "Answer: 519") == 0.0


def test_conversations_chain_answers_and_are_seeded():
    turns = multiturn.conversation(FIRST, np.random.default_rng(1), num_turns=3)
    assert turns[0] is FIRST and len(turns) == 3
    for before, after in zip(turns, turns[1:], strict=False):
        assert after.meta["a"] == int(before.answer)
        assert after.prompt.startswith("Now ")
    again = multiturn.conversation(FIRST, np.random.default_rng(1), num_turns=3)
    assert [p.prompt for p in again] == [p.prompt for p in turns]


def test_only_whole_number_answers_get_follow_ups():
    letters = LETTER_COUNT.generate(np.random.default_rng(0))
    assert multiturn.conversation(letters, np.random.default_rng(0), 2) is not None
    sort = SORTING.generate(np.random.default_rng(0))
    assert multiturn.whole_answer(sort) is None
    assert multiturn.conversation(sort, np.random.default_rng(0), 2) is None
    with pytest.raises(ValueError, match="follow-up kind"):
        multiturn.follow_up(3, "divide", 2)


def test_earlier_turns_are_redacted_and_only_the_last_is_trained(tokenizer):
    turns = multiturn.conversation(FIRST, np.random.default_rng(2), num_turns=3)
    text = render_dialogue(multiturn.conversation_dialogue(turns))
    assert text.count(THOUGHTS) == 1 and FIRST.steps[0] not in text
    assert FIRST.headline in text and FIRST.response in text
    encoded = multiturn.encode_conversation(turns, tokenizer)
    trained = tokenizer.decode(encoded.tokens[encoded.loss_mask > 0])
    assert trained.startswith("<|thinking_block|>") and trained.endswith("<|eot_id|>")
    assert turns[2].headline in trained and turns[1].headline not in trained
    assert encoded.num_steps == len(turns[2].steps)


def test_pipeline_hook_matches_encode_record_layout(tokenizer):
    example = multiturn.multiturn_example(FIRST, tokenizer, seed=0, index=5)
    single = encode_record(problem_to_record(FIRST), tokenizer)
    assert set(example) == set(single)
    for key, value in example.items():
        assert value.dtype == single[key].dtype and value.shape == example["inputs"].shape, key
    np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])
    # The loss sits on the targets of the last turn, which ends the example.
    last = np.flatnonzero(example["loss_mask"])
    assert last[-1] == len(example["inputs"]) - 2 and example["loss_mask"][: last[0]].sum() == 0
    repeat = multiturn.multiturn_example(FIRST, tokenizer, seed=0, index=5)
    np.testing.assert_array_equal(repeat["inputs"], example["inputs"])
    assert (
        multiturn.multiturn_example(
            SORTING.generate(np.random.default_rng(0)), tokenizer, seed=0, index=0
        )
        is None
    )
