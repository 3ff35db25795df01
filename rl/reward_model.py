"""Reward models at inference: load an ORM/PRM run and score responses with it.

A reward model is a train.main run whose objective is "orm" or "prm": the SFT decoder with
a scalar `reward` head, whose per-token output `scores["reward"]` [B, L] is a logit.

  ORM score of a response: sigmoid of the logit at its last token (the closing <|eot_id|>
  when it has one).
  PRM step scores: sigmoid of the logit at each step end, the "\\n" token that closes a
  thought step inside a <|thoughts|> span (`step_end_positions`, exactly the tokens
  data.format.encode_dialogue marks as `step_end`), then, for a finished response, at its
  closing <|eot_id|>: the answer step (`prm_positions`).

Search (best-of-N, step-level beam search) calls `score_tokens`/`score_texts`; RL calls
`reward_logits` for dense rewards. Batches are padded to a fixed row count and to
power-of-two lengths, so scoring many responses compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from data.format import EOT, SPECIAL_TOKENS, THOUGHTS
from model.config import ModelConfig
from model.transformer import Transformer
from rl.generate import user_prompt_tokens

REWARD_KINDS = ("orm", "prm")
MIN_LENGTH_BUCKET = 64


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model: its kind ("orm" or "prm"), parameters, config and tokenizer."""

    kind: str
    params: Any
    model_cfg: ModelConfig
    tokenizer: Any


@dataclasses.dataclass(frozen=True)
class ResponseScore:
    """Probabilities of one response: at its last token, and at each of its step ends."""

    final: float
    steps: np.ndarray  # float32 [S] at `prm_positions`, in order (the answer step last)


def load_reward_model(workdir: str, step: int | None = None) -> RewardModel:
    """Loads the newest (or given) checkpoint of an "orm" or "prm" run."""
    from train.workdir import load_run

    run = load_run(workdir, step=step)
    kind = run.config.objective
    if kind not in REWARD_KINDS or "reward_head" not in run.params:
        raise ValueError(
            f"{workdir} is a {kind!r} run without a reward head; pass the workdir of a run "
            "trained with --config=rm.py:kind=orm or kind=prm"
        )
    return RewardModel(kind, run.params, run.model_cfg, run.tokenizer)


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def reward_logits(
    params, model_cfg: ModelConfig, tokens_BxL, segment_ids_BxL, response_mask_BxL
) -> jax.Array:
    """The reward head's logits [B, L] (float32); segment_ids 0 marks padding, and
    response_mask 1 the response tokens (a surprise-reading head reads only theirs)."""
    out = Transformer(model_cfg, heads=("reward",)).apply(
        {"params": params},
        tokens_BxL,
        segment_ids_BxL=segment_ids_BxL,
        compute_logits=False,  # the vocabulary projection is the costliest layer; skip it
        response_mask_BxL=response_mask_BxL,
        method="forward",
    )
    return out.scores["reward"]


@functools.lru_cache(maxsize=16)
def _marker_ids(tokenizer) -> tuple[int, np.ndarray, int]:
    """(id of <|thoughts|>, ids of the other special tokens, id of "\\n") of a tokenizer."""
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes '\\n' as {newline}; step ends need one token")
    others = np.asarray([tokenizer.token_id(t) for t in SPECIAL_TOKENS if t != THOUGHTS])
    return tokenizer.token_id(THOUGHTS), others, newline[0]


def step_end_positions(tokens, tokenizer) -> np.ndarray:
    """Indices (int32 [S]) of the "\\n" tokens that end thought steps; never raises on tokens.

    A thoughts span runs from a <|thoughts|> id to the next other special token (<|summary|>,
    <|end_thinking_block|>, <|eot_id|>, or any marker a malformed response puts there); a
    span cut off by the end of the tokens runs to the end.
    """
    thoughts_id, other_ids, newline_id = _marker_ids(tokenizer)
    try:
        tokens_T = np.asarray(tokens, np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return np.zeros((0,), np.int32)
    index_T = np.arange(tokens_T.size)
    is_marker_T = (tokens_T == thoughts_id) | np.isin(tokens_T, other_ids)
    # The last marker at or before each token decides whether the token is inside thoughts.
    last_marker_T = np.maximum.accumulate(np.where(is_marker_T, index_T, -1))
    opened_T = (last_marker_T >= 0) & (tokens_T[np.maximum(last_marker_T, 0)] == thoughts_id)
    return np.flatnonzero(opened_T & (tokens_T == newline_id)).astype(np.int32)


def prm_positions(response_tokens, tokenizer) -> np.ndarray:
    """Where a PRM judges a response (int32 [S]): each thought step's end, then, when the
    response is finished (its last token is <|eot_id|>), that token: the answer step.

    The answer step judges what no thought step can: that the steps ran to the end and the
    answer follows from them. Without it, a trace that stops a step early (a letter skipped
    at the end of a long word) or states an answer its steps do not give shows only right
    steps, and a PRM ranks it as high as a complete, right one. It is the step that holds
    the final answer in "Let's Verify Step by Step". Never raises on tokens.
    """
    ends_S = step_end_positions(response_tokens, tokenizer)
    try:
        tokens_T = np.asarray(response_tokens, np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return ends_S
    if tokens_T.size and tokens_T[-1] == tokenizer.eot_id:
        return np.append(ends_S, tokens_T.size - 1).astype(np.int32)
    return ends_S


def _bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n (at least MIN_LENGTH_BUCKET), but at most max(n, cap)."""
    return min(max(MIN_LENGTH_BUCKET, 1 << max(n - 1, 0).bit_length()), max(n, cap))


def _sigmoid(x):
    """Elementwise logistic function in float32."""
    return (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))).astype(np.float32)


def score_tokens(
    rm: RewardModel,
    prompt_tokens: Sequence[Sequence[int]],
    response_tokens: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> list[ResponseScore]:
    """Scores each prompt + response (token ids; end a finished response with <|eot_id|>)."""
    if len(prompt_tokens) != len(response_tokens):
        raise ValueError(
            f"{len(prompt_tokens)} prompts but {len(response_tokens)} responses; pass one each"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [
        [int(t) for t in p] + [int(t) for t in r]
        for p, r in zip(prompt_tokens, response_tokens, strict=True)
    ]
    limit = rm.model_cfg.max_seq_len
    for i, row in enumerate(rows):
        if not row or len(row) > limit:
            raise ValueError(
                f"prompt + response {i} has {len(row)} tokens; the reward model takes 1 to "
                f"{limit} (its max_seq_len): shorten the response"
            )
    pad_id = rm.tokenizer.pad_id
    scores: list[ResponseScore] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = _bucket(max(len(row) for row in chunk), limit)
        tokens_BxL = np.full((batch_size, width), pad_id, np.int32)
        segment_ids_BxL = np.zeros((batch_size, width), np.int32)
        response_mask_BxL = np.zeros((batch_size, width), np.int32)
        for b, row in enumerate(chunk):
            tokens_BxL[b, : len(row)] = row
            segment_ids_BxL[b, : len(row)] = 1
            response_mask_BxL[b, len(prompt_tokens[start + b]) : len(row)] = 1
        logits_BxL = np.asarray(
            reward_logits(rm.params, rm.model_cfg, tokens_BxL, segment_ids_BxL, response_mask_BxL)
        )
        for b, row in enumerate(chunk):
            prompt_len = len(prompt_tokens[start + b])
            ends_S = prompt_len + prm_positions(row[prompt_len:], rm.tokenizer)
            scores.append(
                ResponseScore(
                    final=float(_sigmoid(logits_BxL[b, len(row) - 1])),
                    steps=_sigmoid(logits_BxL[b, ends_S]),
                )
            )
    return scores


def response_tokens_of(text: str, tokenizer) -> list[int]:
    """Token ids of a finished response text: its encoding, closed by <|eot_id|>."""
    body = text[: -len(EOT)] if text.endswith(EOT) else text
    return tokenizer.encode(body) + [tokenizer.eot_id]


def score_texts(
    rm: RewardModel, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 16
) -> list[ResponseScore]:
    """Scores user questions and finished response texts (see `score_tokens`)."""
    return score_tokens(
        rm,
        [user_prompt_tokens(rm.tokenizer, p) for p in prompts],
        [response_tokens_of(r, rm.tokenizer) for r in responses],
        batch_size=batch_size,
    )
