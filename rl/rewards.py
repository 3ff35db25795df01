"""Composable RL rewards: outcome verifier, format, dense PRM steps, length; the KL penalty.

Shapes (suffixes):
  R  sampled responses (rows)     T  generated tokens (right-padded)     L  prompt + response

A reward component maps a batch of sampled `Responses` (and the verifier's verdicts) to
per-token rewards [R, T] in response coordinates: column j is the j-th generated token.
Sequence-level rewards sit on the last generated token; the PRM's on the newline closing each
thought step. `RewardMix` weights and sums the components that `config.rl.rewards` names and
runs the host-side ones (verifiers, the code sandbox) on a thread pool, so that the device can
score log-probs meanwhile. The KL penalty to the reference policy needs log-probs, so the
rollout adds it with `kl_penalty`; it is not a component.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from data.format import ANSWER_PREFIX, parse_assistant
from data.tasks import verify
from data.tasks.base import Problem
from rl import kl as kl_lib


@dataclasses.dataclass(frozen=True)
class Responses:
    """R sampled responses with the problems they answer, as host arrays."""

    problems: Sequence[Problem]
    texts: Sequence[str]  # decoded responses without the stop token
    tokens_RxT: np.ndarray  # int32 generated tokens (stop token included), pad after
    lengths_R: np.ndarray  # int32 generated tokens per row
    finished_R: np.ndarray  # bool: a stop token ended the row
    inputs_RxL: np.ndarray  # int32 prompt + response, pad after (what a reward model reads)
    prompt_lengths_R: np.ndarray  # int32: response token j sits at inputs[r, prompt_len + j]

    @property
    def num_tokens(self) -> int:
        """T, the fixed width of the response arrays."""
        return self.tokens_RxT.shape[1]


# A component: (responses, correct_R) -> float32 rewards [R, T].
RewardFn = Callable[[Responses, np.ndarray], np.ndarray]


def terminal(scores_R: np.ndarray, lengths_R: np.ndarray, num_tokens: int) -> np.ndarray:
    """Sequence scores placed on each row's last generated token, [R, T]."""
    rewards_RxT = np.zeros((len(scores_R), num_tokens), np.float32)
    last_R = np.clip(np.asarray(lengths_R) - 1, 0, num_tokens - 1)
    rewards_RxT[np.arange(len(scores_R)), last_R] = scores_R
    return rewards_RxT


def visible_text(text: str) -> str:
    """The visible answer after the thinking blocks (the whole text if there is none)."""
    parsed = parse_assistant(text)
    return parsed.turn.content if parsed.turn.content else text


def verify_response(problem: Problem, text: str) -> float:
    """The task verifier's score of one response, 0.0 on anything it cannot read."""
    try:
        return float(verify(problem, visible_text(text)))
    except Exception:  # a verifier bug must not take the RL run down; the response scores 0
        return 0.0


def format_score(text: str) -> float:
    """1.0 for well-formed thinking blocks (at least one) and exactly one `Answer:` line."""
    parsed = parse_assistant(text)
    answer_lines = [
        line for line in parsed.turn.content.split("\n") if line.strip().startswith(ANSWER_PREFIX)
    ]
    ok = not parsed.malformed and parsed.complete_blocks >= 1 and len(answer_lines) == 1
    return float(ok)


def length_score(lengths_R: np.ndarray, finished_R: np.ndarray, max_tokens: int, free: int):
    """0 up to `free` tokens, then linearly down to -1 at `max_tokens`; -1 if cut off."""
    over_R = np.clip((np.asarray(lengths_R) - free) / max(max_tokens - free, 1), 0.0, 1.0)
    return np.where(np.asarray(finished_R), -over_R, -1.0).astype(np.float32)


def outcome_reward(responses: Responses, correct_R: np.ndarray) -> np.ndarray:
    """The verifier's score on the last token."""
    return terminal(correct_R, responses.lengths_R, responses.num_tokens)


def format_reward(responses: Responses, correct_R: np.ndarray) -> np.ndarray:
    """`format_score` on the last token."""
    del correct_R
    scores_R = np.asarray([format_score(t) for t in responses.texts], np.float32)
    return terminal(scores_R, responses.lengths_R, responses.num_tokens)


def make_length_reward(free_tokens: int) -> RewardFn:
    """`length_score` on the last token, free up to `free_tokens` generated tokens."""

    def length_reward(responses: Responses, correct_R: np.ndarray) -> np.ndarray:
        del correct_R
        scores_R = length_score(
            responses.lengths_R, responses.finished_R, responses.num_tokens, free_tokens
        )
        return terminal(scores_R, responses.lengths_R, responses.num_tokens)

    return length_reward


# (responses) -> per row, (step-end columns in response coordinates [S], step probs [S]).
StepScorer = Callable[[Responses], list[tuple[np.ndarray, np.ndarray]]]


def make_prm_reward(step_scorer: StepScorer, baseline: float = 0.5) -> RewardFn:
    """Dense PRM reward: (p_step - baseline) / num_steps on each step the PRM judges (each
    thought step's closing newline, and a finished response's <|eot_id|>: the answer step).

    Dividing by the step count makes the total the mean step score minus the baseline, so
    the policy gains nothing by writing more (or fewer) steps, only better ones.
    """

    def prm_reward(responses: Responses, correct_R: np.ndarray) -> np.ndarray:
        del correct_R
        rewards_RxT = np.zeros(responses.tokens_RxT.shape, np.float32)
        for row, (columns_S, probs_S) in enumerate(step_scorer(responses)):
            columns_S = np.asarray(columns_S, np.int64)
            keep_S = (columns_S >= 0) & (columns_S < responses.lengths_R[row])
            if keep_S.any():
                probs_S = np.asarray(probs_S, np.float32)[keep_S]
                rewards_RxT[row, columns_S[keep_S]] += (probs_S - baseline) / keep_S.sum()
        return rewards_RxT

    return prm_reward


def reward_model_step_scorer(prm_workdir: str, tokenizer, batch_size: int) -> StepScorer:
    """A `StepScorer` reading a trained PRM: sigmoid of its logit at each step's newline and,
    for a finished response, at its <|eot_id|> (the answer step: `reward_model.prm_positions`)."""
    import jax

    from rl import reward_model

    prm = reward_model.load_reward_model(prm_workdir)

    def score(responses: Responses) -> list[tuple[np.ndarray, np.ndarray]]:
        inputs_RxL = responses.inputs_RxL
        ends_R = responses.prompt_lengths_R + responses.lengths_R
        columns_L = np.arange(inputs_RxL.shape[1])
        segment_ids_RxL = (columns_L[None] < ends_R[:, None]).astype(np.int32)
        prompt_ends_R = responses.prompt_lengths_R
        response_mask_RxL = segment_ids_RxL * (columns_L[None] >= prompt_ends_R[:, None])
        logits = []
        for start in range(0, len(inputs_RxL), batch_size):
            chunk = slice(start, start + batch_size)
            logits.append(
                np.asarray(
                    reward_model.reward_logits(
                        prm.params,
                        prm.model_cfg,
                        inputs_RxL[chunk],
                        segment_ids_RxL[chunk],
                        response_mask_RxL[chunk],
                    )
                )
            )
        logits_RxL = np.concatenate(logits)
        out = []
        for row in range(len(inputs_RxL)):
            response = responses.tokens_RxT[row, : responses.lengths_R[row]]
            columns_S = np.asarray(reward_model.prm_positions(response, tokenizer), np.int64)
            step_logits_S = logits_RxL[row, responses.prompt_lengths_R[row] + columns_S]
            out.append((columns_S, np.asarray(jax.nn.sigmoid(step_logits_S))))
        return out

    return score


@dataclasses.dataclass(frozen=True)
class Component:
    """One weighted reward; `host` components run on the thread pool."""

    name: str
    weight: float
    fn: RewardFn
    host: bool = True


@dataclasses.dataclass(frozen=True)
class Scored:
    """Rewards of one rollout: the weighted total per token and each component's sums."""

    rewards_RxT: np.ndarray  # float32, weighted sum of the components
    components: dict[str, np.ndarray]  # name -> unweighted per-row sums [R]
    correct_R: np.ndarray  # float32 verifier scores


class RewardMix:
    """A weighted sum of reward components; verifiers always run (accuracy, EI, DPO pairs)."""

    def __init__(self, components: Sequence[Component]):
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"reward components repeat a name: {names}")
        self.components = tuple(components)

    def start(self, responses: Responses, executor: Executor) -> Callable[[], Scored]:
        """Submits the host work now; the returned function finishes and returns the scores.

        Call it after dispatching device work, so that verifiers overlap with the device.
        """
        verdicts = [
            executor.submit(verify_response, p, t)
            for p, t in zip(responses.problems, responses.texts, strict=True)
        ]

        def correct() -> np.ndarray:
            return np.asarray([f.result() for f in verdicts], np.float32)

        host = {
            c.name: executor.submit(lambda c=c: c.fn(responses, correct()))
            for c in self.components
            if c.host
        }

        def finish() -> Scored:
            correct_R = correct()
            per_token = {c.name: host[c.name].result() for c in self.components if c.host}
            for c in self.components:
                if not c.host:  # device components run here, on the caller's thread
                    per_token[c.name] = c.fn(responses, correct_R)
            total_RxT = np.zeros(responses.tokens_RxT.shape, np.float32)
            for c in self.components:
                total_RxT += c.weight * per_token[c.name].astype(np.float32)
            sums = {name: r.sum(axis=1).astype(np.float32) for name, r in per_token.items()}
            return Scored(total_RxT, sums, correct_R)

        return finish

    def __call__(self, responses: Responses, executor: Executor) -> Scored:
        """Scores a batch of responses (blocking)."""
        return self.start(responses, executor)()


# Factories: (rl config, tokenizer) -> (RewardFn, runs on host).
REWARDS: dict[str, Callable[..., tuple[RewardFn, bool]]] = {}


def register_reward(name: str):
    """Decorator registering a component factory `(rl_config, tokenizer) -> (fn, host)`."""

    def wrap(factory):
        REWARDS[name] = factory
        return factory

    return wrap


@register_reward("outcome")
def _outcome(rl_config, tokenizer):
    return outcome_reward, True


@register_reward("format")
def _format(rl_config, tokenizer):
    return format_reward, True


@register_reward("length")
def _length(rl_config, tokenizer):
    return make_length_reward(rl_config.length_free_tokens), True


@register_reward("prm")
def _prm(rl_config, tokenizer):
    scorer = reward_model_step_scorer(rl_config.prm.workdir, tokenizer, rl_config.forward_batch)
    return make_prm_reward(scorer, rl_config.prm.baseline), False


def make_reward_mix(rl_config, tokenizer) -> RewardMix:
    """The mix of `rl_config.rewards` ({name: weight}); zero weights are left out."""
    weights: Mapping[str, float] = rl_config.rewards
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown rewards {unknown} in rl.rewards; registered: {sorted(REWARDS)}")
    components = []
    for name, weight in sorted(weights.items()):
        if weight:
            fn, host = REWARDS[name](rl_config, tokenizer)
            components.append(Component(name, float(weight), fn, host))
    return RewardMix(components)


def kl_penalty(
    logprobs_RxL: np.ndarray, ref_logprobs_RxL: np.ndarray, mask_RxL: np.ndarray, estimator: str
) -> np.ndarray:
    """Per-token KL(policy || reference) estimates on response tokens, 0 elsewhere, [R, L]."""
    kl_RxL = np.asarray(kl_lib.estimate(estimator, logprobs_RxL, ref_logprobs_RxL))
    return np.where(mask_RxL > 0, kl_RxL, 0.0).astype(np.float32)
