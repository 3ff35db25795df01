"""Streaming generation: one prompt decoded in chunks, the KV cache carried from chunk to chunk.

`stream_tokens` prefills the prompt once, then calls the jitted `sampler.decode` for
`chunk_size` tokens at a time, continuing from the cache and logits the previous chunk
returned, and yields each chunk's token ids as soon as it is on the host. Greedy streaming
gives exactly the tokens of one `sampler.sample` call. `decode_pieces` turns the streamed ids
into text pieces, holding back bytes of a character that is not complete yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import sampler

_REPLACEMENT = "\ufffd"  # what a partial UTF-8 byte sequence decodes to
_MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most four byte-fallback tokens


def _bucket(n: int) -> int:
    """The power of two >= n (at least the sampler's smallest prompt bucket)."""
    return max(sampler.MIN_PROMPT_BUCKET, 1 << max(n - 1, 0).bit_length())


def stream_tokens(
    params,
    cfg,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    chunk_size: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_id: int = 0,
    rng=None,
) -> Iterator[np.ndarray]:
    """Yields int32 arrays of new tokens, `chunk_size` at a time (the last may be shorter).

    Stops after a stop token (included in the last chunk) or `max_new_tokens` tokens.
    temperature <= 0 decodes greedily. The prompt is padded to a power of two and the cache
    sized in whole chunks, so a chat reuses a few compiled programs.
    """
    if not len(prompt):
        raise ValueError("stream_tokens needs a prompt of at least one token")
    if max_new_tokens < 1 or chunk_size < 1:
        raise ValueError(
            f"need max_new_tokens >= 1 and chunk_size >= 1; got {max_new_tokens}, {chunk_size}"
        )
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"a prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_seq_len={cfg.max_seq_len}; shorten it or lower max_new_tokens"
        )
    rng = jax.random.PRNGKey(0) if rng is None else rng
    num_chunks = -(-max_new_tokens // chunk_size)
    width = _bucket(len(prompt))
    tokens_1xP = np.full((1, width), pad_id, np.int32)
    tokens_1xP[0, : len(prompt)] = prompt
    cache, logits_1xV = sampler.prefill(
        params,
        cfg,
        jnp.asarray(tokens_1xP),
        jnp.asarray([len(prompt)], jnp.int32),
        width + num_chunks * chunk_size,
    )
    produced = 0
    for chunk in range(num_chunks):
        out = sampler.decode(
            params,
            cfg,
            cache,
            logits_1xV,
            jax.random.fold_in(rng, chunk),  # decode numbers its steps from 0 in every call
            jnp.float32(max(temperature, 1e-6)),
            max_new_tokens=chunk_size,
            top_k=top_k,
            top_p=float(top_p),
            greedy=temperature <= 0,
            stop_tokens=tuple(int(t) for t in stop_tokens),
            pad_id=pad_id,
        )
        length = min(int(out.lengths_B[0]), max_new_tokens - produced)
        produced += length
        yield np.asarray(out.tokens_BxT[0, :length], np.int32)
        if bool(out.done_B[0]) or produced >= max_new_tokens:
            return
        cache, logits_1xV = out.cache, out.last_logits_BxV


@dataclasses.dataclass(frozen=True)
class PieceDecoder:
    """Incremental detokenization: ids of a character not yet complete wait in `pending`."""

    pending: tuple[int, ...] = ()


def decode_next(tokenizer, state: PieceDecoder, token: int) -> tuple[PieceDecoder, str, int]:
    """Adds one token: (state, text it completes, tokens that text stands for)."""
    pending = (*state.pending, int(token))
    text = tokenizer.decode(list(pending))
    if text.endswith(_REPLACEMENT) and len(pending) < _MAX_CHAR_TOKENS:
        return PieceDecoder(pending), "", 0
    return PieceDecoder(), text, len(pending)


def decode_pieces(tokenizer, chunks: Iterable[Sequence[int]]) -> Iterator[tuple[str, int]]:
    """(text, num_tokens) per completed piece of a token stream; pending bytes end it."""
    state = PieceDecoder()
    for chunk in chunks:
        for token in chunk:
            state, text, count = decode_next(tokenizer, state, token)
            if count:
                yield text, count
    if state.pending:
        yield tokenizer.decode(list(state.pending)), len(state.pending)
