"""Chunked streaming equals one-shot greedy sampling; pieces hold back partial characters."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from model import sampler
from rl.stream import decode_pieces, stream_tokens

PROMPT = [5, 9, 17, 3, 3, 40]
MAX_NEW = 10


def one_shot(cfg, params, stop_tokens=()):
    out = sampler.sample(
        params,
        cfg,
        [PROMPT],
        rng=jax.random.PRNGKey(0),
        max_new_tokens=MAX_NEW,
        stop_tokens=stop_tokens,
        greedy=True,
    )
    return np.asarray(out.tokens_BxNxT[0, 0, : int(out.lengths_BxN[0, 0])])


def streamed(cfg, params, chunk_size, stop_tokens=()):
    return list(
        stream_tokens(
            params,
            cfg,
            PROMPT,
            max_new_tokens=MAX_NEW,
            stop_tokens=stop_tokens,
            chunk_size=chunk_size,
        )
    )


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_params):
    """One-shot greedy tokens, no stop token."""
    return one_shot(tiny_cfg, tiny_params)


def test_greedy_chunks_concatenate_to_one_shot_sampling(tiny_cfg, tiny_params, reference):
    chunks = streamed(tiny_cfg, tiny_params, chunk_size=3)
    assert [len(c) for c in chunks] == [3, 3, 3, 1]  # the last chunk cut to max_new_tokens
    np.testing.assert_array_equal(np.concatenate(chunks), reference)


def test_stream_stops_after_the_stop_token(tiny_cfg, tiny_params, reference):
    # A token first seen after the first chunk; greedy tokens before a stop do not depend on
    # it, so one-shot sampling with that stop token would give the reference up to there.
    first_seen = {int(t): i for i, t in reversed(list(enumerate(reference)))}
    stop, at = next((t, i) for t, i in first_seen.items() if i >= 3)
    chunks = streamed(tiny_cfg, tiny_params, 3, stop_tokens=(stop,))
    np.testing.assert_array_equal(np.concatenate(chunks), reference[: at + 1])
    assert len(chunks) == at // 3 + 1


def test_a_prompt_that_does_not_fit_is_refused(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="max_seq_len"):
        next(
            stream_tokens(
                tiny_params,
                tiny_cfg,
                PROMPT,
                max_new_tokens=tiny_cfg.max_seq_len,
                stop_tokens=(),
            )
        )


class ByteTokenizer:
    """Ids are UTF-8 bytes: decoding a lone byte of a longer character gives U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_wait_for_whole_characters():
    ids = list("Hé€!".encode())  # 1 + 2 + 3 + 1 bytes
    chunks = [ids[:2], ids[2:4], ids[4:]]
    pieces = list(decode_pieces(ByteTokenizer(), chunks))
    assert pieces == [("H", 1), ("é", 2), ("€", 3), ("!", 1)]


def test_a_dangling_partial_character_is_flushed_at_the_end():
    pieces = list(decode_pieces(ByteTokenizer(), [[0x41, 0xE2, 0x82]]))
    assert pieces == [("A", 1), ("\ufffd", 2)]
