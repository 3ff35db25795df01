"""Text in, text out: chat prompts through the KV-cache sampler, in fixed-size batches.

Evaluation, the sampling CLI and RL rollouts all generate through `generate`. Batches are
padded to `batch_size` rows so every call reuses one compiled sampler.

With several JAX processes every jitted call must get the same inputs on every process, and
its outputs may be split over processes. `generate` takes the same questions everywhere;
`sample_rows` gathers each process's own prompts, samples them in one call spread over the
mesh and hands each process back its rows; `host_value` fetches any output whole.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from data.format import Dialogue, Turn, encode_prompt
from model import sampler


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled response: its text, token ids and per-token log-probs."""

    prompt: str
    text: str  # decoded response without the closing <|eot_id|>
    tokens: np.ndarray  # int32 [T], including the stop token when one was sampled
    logprobs: np.ndarray  # float32 [T]
    finished: bool  # a stop token was sampled before max_new_tokens


def host_value(x) -> np.ndarray:
    """The whole of array `x` as numpy; gathered from the other processes if split over them."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def all_process_rows(local):
    """A pytree of host arrays with every process's rows, in process order (a collective)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, local)
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True)), local
    )


def own_rows(rows, num_local: int):
    """This process's `num_local` rows of a pytree laid out by `all_process_rows`."""
    start = jax.process_index() * num_local
    return jax.tree.map(lambda x: x[start : start + num_local], rows)


def sample_rows(params, cfg, prompts, *, rng, pad_id: int = 0, **options) -> sampler.SampleOutput:
    """`sampler.sample` of this process's prompts; numpy arrays of this process's rows.

    Every process's prompts go into one call, so its inputs agree across processes and its
    rows spread over the whole mesh. `rng` must be the same on every process; `options` are
    `sampler.sample`'s other keyword arguments.
    """
    tokens_BxP, lengths_B = sampler.pad_prompts(prompts, pad_id)
    if jax.process_count() > 1:
        # One width for all: the longest prompt of any process.
        width = int(multihost_utils.process_allgather(np.int32(tokens_BxP.shape[1])).max())
        tokens_BxP = np.pad(
            tokens_BxP, ((0, 0), (0, width - tokens_BxP.shape[1])), constant_values=pad_id
        )
    out = sampler.sample(
        params, cfg, all_process_rows((tokens_BxP, lengths_B)), rng=rng, pad_id=pad_id, **options
    )
    return own_rows(jax.tree.map(host_value, out), len(lengths_B))


def user_prompt_tokens(tokenizer, question: str) -> list[int]:
    """Token ids of the generation prompt for a single user question."""
    return [int(t) for t in encode_prompt(Dialogue((Turn("user", question),)), tokenizer)]


def generate(
    params,
    model_cfg,
    tokenizer,
    questions: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    num_samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng=None,
) -> list[list[Generation]]:
    """Samples `num_samples` responses for every question; returns one list per question."""
    prompts = [user_prompt_tokens(tokenizer, q) for q in questions]
    too_long = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens > model_cfg.max_seq_len]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"Prompt {i} has {len(prompts[i])} tokens; with max_new_tokens={max_new_tokens} it "
            f"exceeds the model's context of {model_cfg.max_seq_len} tokens. Shorten the prompt "
            "or lower max_new_tokens."
        )
    rng = jax.random.PRNGKey(0) if rng is None else rng
    results: list[list[Generation]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # Pad the batch with copies of its first prompt so the compiled shape never changes.
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        out = sampler.sample(
            params,
            model_cfg,
            padded,
            rng=jax.random.fold_in(rng, start),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            stop_tokens=(tokenizer.eot_id,),
            pad_id=tokenizer.pad_id,
            num_samples=num_samples,
        )
        tokens = host_value(out.tokens_BxNxT)
        logprobs = host_value(out.logprobs_BxNxT)
        lengths = host_value(out.lengths_BxN)
        done = host_value(out.done_BxN)
        for row, question in enumerate(questions[start : start + len(chunk)]):
            samples = []
            for n in range(num_samples):
                ids = tokens[row, n, : lengths[row, n]]
                text_ids = ids[:-1] if done[row, n] else ids
                samples.append(
                    Generation(
                        prompt=question,
                        text=tokenizer.decode([int(t) for t in text_ids]),
                        tokens=ids,
                        logprobs=logprobs[row, n, : lengths[row, n]],
                        finished=bool(done[row, n]),
                    )
                )
            results.append(samples)
    return results
