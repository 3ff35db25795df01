"""The reward-model scoring API: step ends in token streams, padded batched scoring."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from data import format as fmt
from data import tasks
from data.tokenizer import train_tokenizer
from model import config as model_config
from model import transformer
from rl import reward_model
from rl.generate import user_prompt_tokens
from rl.reward_model import (
    RewardModel,
    prm_positions,
    score_texts,
    score_tokens,
    step_end_positions,
)


@pytest.fixture(scope="module")
def problems():
    mix = {
        "addition": {"weight": 1.0, "knobs": {"digits": 3}},
        "letter_count": {"weight": 1.0, "knobs": {}},
    }
    return tasks.generate_problems(mix, 16, 1, "train")


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer(
        [fmt.render_dialogue(fmt.problem_to_dialogue(p)) for p in problems], vocab_size=400
    )


@pytest.fixture(scope="module")
def rm(tokenizer):
    """A random tiny decoder with a reward head, over this tokenizer's vocabulary."""
    cfg = dataclasses.replace(
        model_config.get_preset("tiny"), vocab_size=tokenizer.vocab_size, max_seq_len=512
    )
    # Random weights of the right shapes: any weights do here, and tracing is far cheaper
    # than compiling the initializer.
    shapes = jax.eval_shape(
        lambda key: transformer.init_params(cfg, key, heads=("reward",)), jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), shapes)
    return RewardModel("prm", params, cfg, tokenizer)


def ids(text, tokenizer) -> list[int]:
    return tokenizer.encode(text)


# ---------------------------------------------------------------------------- step ends


def test_step_ends_match_encode_dialogue(problems, tokenizer):
    for problem in problems:
        encoded = fmt.encode_dialogue(fmt.problem_to_dialogue(problem), tokenizer)
        np.testing.assert_array_equal(
            step_end_positions(encoded.tokens, tokenizer), np.flatnonzero(encoded.step_end)
        )
        assert encoded.num_steps == len(problem.steps)


@pytest.mark.parametrize(
    "text, steps",
    [
        ("plain\ntext\n", []),  # no thoughts span
        ("<|thoughts|>a\nb\n<|summary|>s\n<|end_thinking_block|>\nx\n", ["a", "b"]),
        ("<|thoughts|>a\nb\nc", ["a", "b"]),  # cut off inside thoughts: the last has no end
        ("<|thoughts|>a\n<|eot_id|>b\n", ["a"]),  # closed by <|eot_id|>
        ("<|thoughts|>a\n<|end_thinking_block|>b\n", ["a"]),
        ("<|thoughts|>a\n<|headline|>h\n<|thoughts|>b\n", ["a", "b"]),  # any marker closes
        ("<|summary|>s\n<|thoughts|>\n\n", ["", ""]),  # empty steps are steps
        (
            "<|thoughts|>a\n<|summary|>s\n<|end_thinking_block|>\n"
            "<|thinking_block|><|headline|>h\n<|thoughts|>b\n<|summary|>t\n",
            ["a", "b"],
        ),  # two blocks
        ("", []),
    ],
)
def test_step_ends_on_broken_streams(tokenizer, text, steps):
    tokens = ids(text, tokenizer)
    ends = step_end_positions(tokens, tokenizer)
    assert ends.dtype == np.int32
    assert all(tokenizer.decode([tokens[e]]) == "\n" for e in ends)
    # The step text is what lies between the previous step end (or marker) and this end.
    texts = [tokenizer.decode(tokens[: e + 1]).split("\n")[-2].split("|>")[-1] for e in ends]
    assert texts == steps


@pytest.mark.parametrize("bad", [["a", "b"], [[1, 2], [3]], None, [1.5, object()]])
def test_step_ends_never_raise(tokenizer, bad):
    assert step_end_positions(bad, tokenizer).size == 0


# ---------------------------------------------------------------------------- scoring


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_score_tokens_reads_the_last_token_and_the_step_ends(problems, tokenizer, rm):
    prompts, responses = [], []
    for problem in problems[:5]:
        prompts.append(user_prompt_tokens(tokenizer, problem.prompt))
        turn = fmt.problem_to_dialogue(problem).turns[-1]
        responses.append(ids(fmt.render_assistant(turn), tokenizer) + [tokenizer.eot_id])
    responses[3] = responses[3][:7]  # unfinished, no step end yet
    scores = score_tokens(rm, prompts, responses, batch_size=2)
    assert len(scores) == 5
    # The reference: all rows in one batch, padded to the longest (no bucket, other rows).
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    segments, response = np.zeros_like(tokens), np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], segments[i, : len(row)] = row, 1
        response[i, len(prompts[i]) : len(row)] = 1
    reference = np.asarray(
        reward_model.reward_logits(rm.params, rm.model_cfg, tokens, segments, response)
    )
    for i, (prompt, response, score) in enumerate(zip(prompts, responses, scores, strict=True)):
        logits = reference[i, : len(rows[i])]
        ends = len(prompt) + step_end_positions(response, tokenizer)
        if i != 3:  # a finished response: its <|eot_id|> is the answer step
            ends = np.append(ends, len(rows[i]) - 1)
        # Batches of 2 at power-of-two widths give the same numbers.
        np.testing.assert_allclose(score.final, sigmoid(logits[-1]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(score.steps, sigmoid(logits[ends]), rtol=1e-4, atol=1e-6)
    # Each thought step, then the answer step; row 3 was cut before its first step ended.
    expected = [len(problem.steps) + 1 for problem in problems[:5]]
    expected[3] = 0
    assert [s.steps.size for s in scores] == expected


def test_a_surprise_reading_head_reads_the_response_not_the_prompt(problems, tokenizer, rm):
    """An ORM-style head whose window spans the whole row: at the last token its logit is
    bias - s * (largest surprise over the response tokens), the prompt's left out."""
    cfg = dataclasses.replace(rm.model_cfg, reward_surprise_window=rm.model_cfg.max_seq_len)
    head = {
        "linear": {"kernel": np.zeros((cfg.d_model, 1), np.float32), "bias": np.full((1,), 2.0)},
        "surprise_scale": np.zeros((1,), np.float32),  # s = softplus(0) = log 2
    }
    surprise_rm = RewardModel("orm", {**rm.params, "reward_head": head}, cfg, tokenizer)
    prompt = user_prompt_tokens(tokenizer, problems[0].prompt)
    response = ids(fmt.render_assistant(fmt.problem_to_dialogue(problems[0]).turns[-1]), tokenizer)
    response = response[:40] + [tokenizer.eot_id]
    (score,) = score_tokens(surprise_rm, [prompt], [response])
    row = np.asarray([prompt + response])
    logits = transformer.Transformer(cfg).apply({"params": rm.params}, row, method="forward").logits
    surprise = np.asarray(transformer.token_surprise(logits, row, np.ones_like(row)))[0]
    in_response, in_prompt = surprise[len(prompt) :].max(), surprise[: len(prompt)].max()
    assert in_prompt > in_response  # so reading the prompt would change the score
    np.testing.assert_allclose(
        score.final, sigmoid(2.0 - np.log(2.0) * in_response), rtol=1e-4, atol=1e-6
    )


def test_rl_prm_reward_scores_as_score_tokens_does(problems, tokenizer, rm, monkeypatch):
    """RL's dense PRM reward reads fixed-width rollout rows; with a surprise-reading head
    its step probabilities must still match score_tokens (response surprise only; the window
    reaches back into the prompt, whose surprise must not count)."""
    from rl import rewards

    cfg = dataclasses.replace(rm.model_cfg, reward_surprise_window=rm.model_cfg.max_seq_len)
    head = {"linear": rm.params["reward_head"], "surprise_scale": np.zeros((1,), np.float32)}
    surprise_rm = RewardModel("prm", {**rm.params, "reward_head": head}, cfg, tokenizer)
    monkeypatch.setattr(reward_model, "load_reward_model", lambda workdir: surprise_rm)
    prompts, responses = [], []
    for problem in problems[:3]:
        prompts.append(user_prompt_tokens(tokenizer, problem.prompt))
        turn = fmt.problem_to_dialogue(problem).turns[-1]
        responses.append(ids(fmt.render_assistant(turn), tokenizer)[:60] + [tokenizer.eot_id])
    width, num_tokens = 200, 80
    inputs_RxL = np.zeros((3, width), np.int32)
    tokens_RxT = np.zeros((3, num_tokens), np.int32)
    for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        inputs_RxL[r, : len(prompt) + len(response)] = prompt + response
        tokens_RxT[r, : len(response)] = response
    rollouts = rewards.Responses(
        problems=problems[:3],
        texts=[""] * 3,
        tokens_RxT=tokens_RxT,
        lengths_R=np.array([len(r) for r in responses], np.int32),
        finished_R=np.ones(3, bool),
        inputs_RxL=inputs_RxL,
        prompt_lengths_R=np.array([len(p) for p in prompts], np.int32),
    )
    scored = rewards.reward_model_step_scorer("unused", tokenizer, batch_size=2)(rollouts)
    expected = score_tokens(surprise_rm, prompts, responses)
    for (columns_S, probs_S), score, response in zip(scored, expected, responses, strict=True):
        np.testing.assert_array_equal(columns_S, prm_positions(response, tokenizer))
        np.testing.assert_allclose(probs_S, score.steps, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "text, eot, expected",
    [
        ("<|thoughts|>a\nb\n<|summary|>s\n", True, "ends + eot"),
        ("<|thoughts|>a\nb\n<|summary|>s\n", False, "ends"),  # cut off: no answer step
        ("Answer: 3", True, "eot"),  # no thought step, still an answer to judge
        ("", False, "ends"),
    ],
)
def test_prm_positions_add_the_answer_step_of_a_finished_response(tokenizer, text, eot, expected):
    tokens = ids(text, tokenizer) + [tokenizer.eot_id] * eot
    ends = step_end_positions(tokens, tokenizer)
    want = {"ends + eot": [*ends, len(tokens) - 1], "ends": list(ends), "eot": [len(tokens) - 1]}
    positions = prm_positions(tokens, tokenizer)
    assert positions.dtype == np.int32 and positions.tolist() == want[expected]
    assert prm_positions([None, "x"], tokenizer).size == 0  # never raises


def test_score_texts_closes_responses_with_eot(problems, tokenizer, rm):
    problem = problems[0]
    text = fmt.render_assistant(fmt.problem_to_dialogue(problem).turns[-1])
    (from_text,) = score_texts(rm, [problem.prompt], [text])
    (with_eot,) = score_texts(rm, [problem.prompt], [text + fmt.EOT])
    (from_tokens,) = score_tokens(
        rm,
        [user_prompt_tokens(tokenizer, problem.prompt)],
        [ids(text, tokenizer) + [tokenizer.eot_id]],
    )
    assert from_text.final == with_eot.final == from_tokens.final
    np.testing.assert_array_equal(from_text.steps, from_tokens.steps)
    assert from_text.steps.size == len(problem.steps) + 1  # + the answer step
    assert 0.0 < from_text.final < 1.0


def test_score_tokens_rejects_bad_input(tokenizer, rm):
    with pytest.raises(ValueError, match="one each"):
        score_tokens(rm, [[1, 2]], [])
    with pytest.raises(ValueError, match="max_seq_len"):
        score_tokens(rm, [[1] * 400], [[2] * 200])
