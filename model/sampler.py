"""KV-cache sampling: prefill right-padded prompts, then decode in one jitted `lax.while_loop`.

Prompts are right-padded (left-aligned): row b's prompt fills slots 0..len_b-1 of the cache and
every row decodes at its own positions, so a prompt padded into a batch decodes like alone.

Log-probs returned by `decode`, `sample` and `score` are always those of the model itself at
temperature 1, with no top-k/top-p filtering (what PPO's ratio and KL need), whatever
temperature and filters chose the token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import KVCache, Transformer, init_cache, unstack_layers

Array = jax.Array
Params = dict[str, Any]

MIN_PROMPT_BUCKET = 16
# `decode`'s default phase: the cache it attends over grows by this many slots at a time.
DECODE_PHASE_TOKENS = 64


@flax.struct.dataclass
class SampleOutput:
    """Samples for B prompts, N each, T = max_new_tokens; pad_id and 0.0 after a row ends."""

    tokens_BxNxT: Array  # int32, including the stop token when one was sampled
    logprobs_BxNxT: Array  # float32, log p(token) at temperature 1
    lengths_BxN: Array  # int32, tokens generated (stop token included)
    done_BxN: Array  # bool, a stop token was sampled


@flax.struct.dataclass
class DecodeOutput:
    """`decode`'s tokens plus the cache and next-token logits, ready to continue from."""

    tokens_BxT: Array
    logprobs_BxT: Array
    lengths_B: Array
    done_B: Array
    cache: KVCache  # holds every generated token (a row's padding after it ends is not counted)
    last_logits_BxV: Array  # logits after each row's last real token


@flax.struct.dataclass
class _LoopState:
    """The while_loop carry."""

    step: Array  # int32 scalar
    tokens_BxT: Array
    logprobs_BxT: Array
    lengths_B: Array
    done_B: Array
    cache: KVCache
    logits_BxV: Array
    rng: Array


# ----------------------------------------------------------------------------- cache building


@functools.partial(jax.jit, static_argnames=("cfg",))
def extend(
    params: Params, cfg: ModelConfig, cache: KVCache, tokens_BxL: Array, lengths_B: Array
) -> tuple[KVCache, Array]:
    """Appends each row's first lengths_B[b] (>= 1) tokens; returns (cache, logits after them)."""
    L = tokens_BxL.shape[1]
    segment_ids_BxL = (jnp.arange(L)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    model = Transformer(cfg)
    out = model.apply(
        {"params": params},
        tokens_BxL,
        segment_ids_BxL=segment_ids_BxL,
        cache=cache,
        compute_logits=False,
        method="forward",
    )
    # Project only each row's last real token: the full [B, L, V] logits can be huge.
    last_index_Bx1x1 = (lengths_B - 1)[:, None, None]
    hidden_Bx1xD = jnp.take_along_axis(out.hidden_BxLxD, last_index_Bx1x1, axis=1)
    logits_Bx1xV = model.apply({"params": params}, hidden_Bx1xD, method="unembed")
    return out.cache, logits_Bx1xV[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(
    params: Params,
    cfg: ModelConfig,
    prompt_tokens_BxP: Array,
    prompt_lengths_B: Array,
    max_len: int,
) -> tuple[KVCache, Array]:
    """A `max_len`-slot cache holding right-padded prompts, and the logits after each prompt."""
    cache = init_cache(cfg, prompt_tokens_BxP.shape[0], max_len)
    return extend(params, cfg, cache, prompt_tokens_BxP, prompt_lengths_B)


def fork_cache(cache: KVCache, n: int) -> KVCache:
    """Repeats every row n times (rows b*n .. b*n+n-1 share row b's prefix)."""
    return cache.map_rows(lambda x: jnp.repeat(x, n, axis=0))


def fork_rows(x_Bx: Array, n: int) -> Array:
    """Repeats every row of a batch-major array n times, matching `fork_cache` (e.g. logits)."""
    return jnp.repeat(x_Bx, n, axis=0)


# ----------------------------------------------------------------------------- token choice


def _filter_top_k(logits_BxV: Array, k: int) -> Array:
    """Keeps the k largest logits of each row."""
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def _filter_top_p(logits_BxV: Array, top_p: float) -> Array:
    """Keeps the smallest set of most likely tokens holding probability top_p (at least one)."""
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.sum(mass_before_BxV < top_p, axis=-1)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, (kept_B - 1)[:, None], axis=-1)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def first_argmax(x_BxV: Array) -> Array:
    """int32 [B]: the first index of each row's maximum, as `jnp.argmax` (a NaN row gives V-1).

    Two plain reductions instead of argmax's (value, index) pair reduction, which XLA:CPU
    runs unvectorized: with the Gumbel noise of a draw fused in, 1.6 -> 0.7 ms per step at
    64 x 1024 on a 2-core CPU.
    """
    max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    index_BxV = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, 1)
    V = x_BxV.shape[-1]
    return jnp.minimum(jnp.min(jnp.where(x_BxV == max_Bx1, index_BxV, V), axis=-1), V - 1)


def choose_tokens(
    logits_BxV: Array,
    rng: Array,
    temperature: Array | float,
    *,
    top_k: int,
    top_p: float,
    greedy: bool,
) -> Array:
    """Next tokens [B]: argmax when greedy, else a draw from the tempered, filtered logits."""
    if greedy:
        return first_argmax(logits_BxV)
    logits_BxV = logits_BxV / temperature
    if 0 < top_k < logits_BxV.shape[-1]:
        logits_BxV = _filter_top_k(logits_BxV, top_k)
    if top_p < 1.0:
        logits_BxV = _filter_top_p(logits_BxV, top_p)
    # The Gumbel-max draw of jax.random.categorical (the same noise, so the same tokens).
    return first_argmax(logits_BxV + jax.random.gumbel(rng, logits_BxV.shape, logits_BxV.dtype))


# ----------------------------------------------------------------------------- decoding


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "top_k",
        "top_p",
        "greedy",
        "stop_tokens",
        "pad_id",
        "phase_tokens",
    ),
)
def decode(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    last_logits_BxV: Array,
    rng: Array,
    temperature: Array | float = 1.0,
    *,
    max_new_tokens: int,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    phase_tokens: int = DECODE_PHASE_TOKENS,
) -> DecodeOutput:
    """Samples up to max_new_tokens per row; the cache needs that many free slots per row.

    Each step's attention reads every slot of the cache it is given, written or not. So the
    loop runs in phases of `phase_tokens` steps, each over the cache cut to the slots its
    steps can reach (S - T + the phase's last step, since every row starts with at most
    S - T slots written); between phases the cache is padded to the next phase's size.
    From a 32-token prompt, 256 new tokens then read 192 slots per step on average instead
    of 288, for one copy of the cache per phase: batch 64 on a 2-core CPU, 3.6k -> 4.3k
    tokens/s with 6 kv heads, 5.4k -> 6.3k with 2 (and 1.6-1.7x at 512 new tokens). Each
    phase is its own while loop in the compiled program, so longer phases compile less.
    """
    B, T = last_logits_BxV.shape[0], max_new_tokens
    S = cache.max_len
    if phase_tokens < 1:
        raise ValueError(f"phase_tokens must be >= 1, got {phase_tokens}")
    if cfg.scan_layers:
        # A cached forward runs the layers unrolled (Transformer._cached_layers): unstacked
        # once here, each step reads every layer's weights where they lie.
        params, cfg = unstack_layers(params), dataclasses.replace(cfg, scan_layers=False)
    model = Transformer(cfg)
    stop_ids = jnp.asarray(stop_tokens, jnp.int32)

    def step(state: _LoopState) -> _LoopState:
        token_B = choose_tokens(
            state.logits_BxV,
            jax.random.fold_in(state.rng, state.step),
            temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
        )
        logprob_B = jnp.take_along_axis(
            jax.nn.log_softmax(state.logits_BxV, axis=-1), token_B[:, None], axis=-1
        )[:, 0]
        active_B = ~state.done_B
        token_B = jnp.where(active_B, token_B, pad_id)
        logprob_B = jnp.where(active_B, logprob_B, 0.0)
        hit_stop_B = jnp.isin(token_B, stop_ids) if stop_tokens else jnp.zeros_like(active_B)
        # Finished rows feed padding, which the cache does not count as written.
        out = model.apply(
            {"params": params},
            token_B[:, None],
            segment_ids_BxL=active_B[:, None].astype(jnp.int32),
            cache=state.cache,
            method="forward",
        )
        return _LoopState(
            step=state.step + 1,
            tokens_BxT=state.tokens_BxT.at[:, state.step].set(token_B),
            logprobs_BxT=state.logprobs_BxT.at[:, state.step].set(logprob_B),
            lengths_B=state.lengths_B + active_B.astype(jnp.int32),
            done_B=state.done_B | (active_B & hit_stop_B),
            cache=out.cache,
            logits_BxV=jnp.where(active_B[:, None], out.logits[:, 0], state.logits_BxV),
            rng=state.rng,
        )

    def keep_going(state: _LoopState) -> Array:
        return (state.step < T) & ~jnp.all(state.done_B)

    init = _LoopState(
        step=jnp.zeros((), jnp.int32),
        tokens_BxT=jnp.full((B, T), pad_id, jnp.int32),
        logprobs_BxT=jnp.zeros((B, T), jnp.float32),
        lengths_B=jnp.zeros((B,), jnp.int32),
        done_B=jnp.zeros((B,), bool),
        cache=cache,
        logits_BxV=last_logits_BxV.astype(jnp.float32),
        rng=rng,
    )
    state = init
    for phase_end in [*range(phase_tokens, T, phase_tokens), T]:
        state = state.replace(cache=state.cache.with_slots(S - T + phase_end))
        state = jax.lax.while_loop(
            lambda s, end=phase_end: keep_going(s) & (s.step < end), step, state
        )
    return DecodeOutput(
        tokens_BxT=state.tokens_BxT,
        logprobs_BxT=state.logprobs_BxT,
        lengths_B=state.lengths_B,
        done_B=state.done_B,
        cache=state.cache,
        last_logits_BxV=state.logits_BxV,
    )


# ----------------------------------------------------------------------------- sampling


def _bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum), so few shapes ever compile."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def pad_prompts(
    prompts: Sequence[Sequence[int]] | tuple[Any, Any], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 tokens [B, P] and lengths [B], from token lists or such a pair."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        tokens_BxP = np.asarray(prompts[0], np.int32)
        lengths_B = np.asarray(prompts[1], np.int32)
        if tokens_BxP.ndim != 2 or tokens_BxP.shape[0] != lengths_B.shape[0]:
            raise ValueError(
                f"prompt tokens {tokens_BxP.shape} and lengths {lengths_B.shape} must be "
                "[B, P] and [B]"
            )
        if lengths_B.size and lengths_B.max() > tokens_BxP.shape[1]:
            raise ValueError("a prompt length exceeds the width of the prompt tokens array")
        return tokens_BxP, lengths_B
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    tokens_BxP = np.full((len(prompts), max(lengths_B, default=0)), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens_BxP[row, : len(prompt)] = prompt
    return tokens_BxP, lengths_B


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "num_samples",
        "top_k",
        "top_p",
        "greedy",
        "stop_tokens",
        "pad_id",
    ),
)
def _generate(
    params: Params,
    cfg: ModelConfig,
    tokens_BxP: Array,
    lengths_B: Array,
    rng: Array,
    temperature: Array,
    *,
    max_new_tokens: int,
    num_samples: int,
    top_k: int,
    top_p: float,
    greedy: bool,
    stop_tokens: tuple[int, ...],
    pad_id: int,
) -> SampleOutput:
    """Prefill once per prompt, fork to num_samples rows, decode; reshaped to [B, N, ...]."""
    B, P = tokens_BxP.shape
    cache, logits_BxV = prefill(params, cfg, tokens_BxP, lengths_B, P + max_new_tokens)
    out = decode(
        params,
        cfg,
        fork_cache(cache, num_samples),
        fork_rows(logits_BxV, num_samples),
        rng,
        temperature,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
    )
    N = num_samples
    return SampleOutput(
        tokens_BxNxT=out.tokens_BxT.reshape(B, N, max_new_tokens),
        logprobs_BxNxT=out.logprobs_BxT.reshape(B, N, max_new_tokens),
        lengths_BxN=out.lengths_B.reshape(B, N),
        done_BxN=out.done_B.reshape(B, N),
    )


def sample(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]] | tuple[Any, Any],
    *,
    rng: Array,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    pad_id: int = 0,
    num_samples: int = 1,
) -> SampleOutput:
    """Samples num_samples continuations of each prompt (token lists, or right-padded
    (tokens [B, P], lengths [B])). temperature <= 0 means greedy. Batch and prompt length are
    padded up to powers of two so repeated calls reuse a few compiled programs."""
    tokens_BxP, lengths_B = pad_prompts(prompts, pad_id)
    B = len(lengths_B)
    if B == 0:
        raise ValueError("sample() needs at least one prompt")
    if lengths_B.min() < 1:
        raise ValueError(f"prompt {int(np.argmin(lengths_B))} is empty; every prompt needs a token")
    if max_new_tokens < 1 or num_samples < 1 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"need max_new_tokens >= 1, num_samples >= 1, top_k >= 0 and 0 < top_p <= 1; got "
            f"{max_new_tokens}, {num_samples}, {top_k}, {top_p}"
        )
    longest = int(lengths_B.max())
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_seq_len={cfg.max_seq_len}; shorten it or lower max_new_tokens"
        )
    B_pad = _bucket(B, 1)
    P_pad = _bucket(tokens_BxP.shape[1], MIN_PROMPT_BUCKET)
    tokens_pad = np.full((B_pad, P_pad), pad_id, np.int32)
    tokens_pad[:B, : tokens_BxP.shape[1]] = tokens_BxP
    lengths_pad = np.ones((B_pad,), np.int32)  # filler rows decode a 1-token prompt of pad_id
    lengths_pad[:B] = lengths_B
    out = _generate(
        params,
        cfg,
        jnp.asarray(tokens_pad),
        jnp.asarray(lengths_pad),
        rng,
        jnp.float32(max(temperature, 1e-6)),
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        top_k=top_k,
        top_p=float(top_p),
        greedy=greedy or temperature <= 0,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=pad_id,
    )
    # Slicing compiles a program per shape and sharding: skip it when no row was added.
    return out if B_pad == B else jax.tree.map(lambda x: x[:B], out)


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(
    params: Params, cfg: ModelConfig, tokens_BxL: Array, segment_ids_BxL: Array | None = None
) -> Array:
    """log p(tokens[:, t] | tokens before t) [B, L], by full recomputation at temperature 1.

    0 at t = 0, at padding (segment 0) and at the first token of each packed segment.
    """
    B, L = tokens_BxL.shape
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((B, L), jnp.int32)
    logits_BxLxV = Transformer(cfg).apply(
        {"params": params}, tokens_BxL, segment_ids_BxL=segment_ids_BxL
    )
    # log_softmax at the target only: logit minus logsumexp, without a [B, L, V] log-prob array.
    logits_BxLxV = logits_BxLxV[:, :-1]
    targets_BxL = tokens_BxL[:, 1:]
    picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    logprobs_BxL = picked_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1)
    same_segment_BxL = (segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1]) & (
        segment_ids_BxL[:, 1:] != 0
    )
    logprobs_BxL = jnp.where(same_segment_BxL, logprobs_BxL, 0.0)
    return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), logprobs_BxL], axis=1)
