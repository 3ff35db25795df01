"""The KV-cache sampler against full recomputation, padding, stops, filters and forking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import sampler
from model.transformer import Transformer

T = 8  # new tokens in every test, so compiled decoders are shared
PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2], [42, 7, 7, 100, 8]]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(cfg, params, tokens_BxL):
    return Transformer(cfg).apply({"params": params}, tokens_BxL)


def _greedy_by_recomputation(cfg, params, prompt, steps):
    """Greedy tokens and their log-probs, running the whole sequence through the model each step."""
    width = 32  # right padding never changes earlier logits, so one compiled width serves all
    seq, tokens, logprobs = list(prompt), [], []
    for _ in range(steps):
        padded = jnp.array([seq + [0] * (width - len(seq))], jnp.int32)
        logprobs_V = jax.nn.log_softmax(_logits(cfg, params, padded)[0, len(seq) - 1])
        token = int(jnp.argmax(logprobs_V))
        tokens.append(token)
        logprobs.append(float(logprobs_V[token]))
        seq.append(token)
    return tokens, logprobs


def _sample(cfg, params, prompts, **kwargs):
    kwargs = {"rng": jax.random.PRNGKey(0), "max_new_tokens": T, "stop_tokens": (), **kwargs}
    return sampler.sample(params, cfg, prompts, **kwargs)


@pytest.fixture(scope="module")
def greedy(tiny_cfg, tiny_params):
    """Greedy samples of PROMPTS with no stop tokens."""
    return _sample(tiny_cfg, tiny_params, PROMPTS, greedy=True)


def test_greedy_with_cache_equals_full_recomputation(tiny_cfg, tiny_params, greedy):
    assert greedy.tokens_BxNxT.shape == (3, 1, T)
    np.testing.assert_array_equal(greedy.lengths_BxN, T)
    assert not np.asarray(greedy.done_BxN).any()
    for row, prompt in enumerate(PROMPTS):
        tokens, logprobs = _greedy_by_recomputation(tiny_cfg, tiny_params, prompt, T)
        np.testing.assert_array_equal(greedy.tokens_BxNxT[row, 0], tokens)
        np.testing.assert_allclose(greedy.logprobs_BxNxT[row, 0], logprobs, atol=1e-5)


def test_prompt_decodes_the_same_alone_and_in_a_padded_batch(tiny_cfg, tiny_params, greedy):
    alone = _sample(tiny_cfg, tiny_params, [PROMPTS[2]], greedy=True)
    long_prompt = list(range(1, 21))  # moves the batch to the next prompt-length bucket
    batch = _sample(tiny_cfg, tiny_params, [[11], PROMPTS[2], long_prompt], greedy=True)
    for other, row in [(greedy, 2), (batch, 1)]:
        np.testing.assert_array_equal(other.tokens_BxNxT[row], alone.tokens_BxNxT[0])
        np.testing.assert_allclose(other.logprobs_BxNxT[row], alone.logprobs_BxNxT[0], atol=1e-5)


def test_rows_stop_at_their_own_stop_token(tiny_cfg, tiny_params, greedy):
    free_BxT = np.asarray(greedy.tokens_BxNxT[:, 0])
    stop = int(free_BxT[0, 2])
    stopped = _sample(tiny_cfg, tiny_params, PROMPTS, greedy=True, stop_tokens=(stop,), pad_id=0)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free_BxT[row] == stop)
        length = int(hits[0]) + 1 if hits.size else T
        assert int(stopped.lengths_BxN[row, 0]) == length
        assert bool(stopped.done_BxN[row, 0]) == bool(hits.size)
        np.testing.assert_array_equal(stopped.tokens_BxNxT[row, 0, :length], free_BxT[row, :length])
        np.testing.assert_array_equal(stopped.tokens_BxNxT[row, 0, length:], 0)
        np.testing.assert_array_equal(stopped.logprobs_BxNxT[row, 0, length:], 0.0)
    assert bool(stopped.done_BxN[0, 0]) and int(stopped.lengths_BxN[0, 0]) <= 3


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-4}, {"temperature": 0.0}])
def test_degenerate_sampling_equals_greedy(tiny_cfg, tiny_params, greedy, filters):
    out = _sample(tiny_cfg, tiny_params, PROMPTS, rng=jax.random.PRNGKey(7), **filters)
    np.testing.assert_array_equal(out.tokens_BxNxT, greedy.tokens_BxNxT)
    np.testing.assert_allclose(out.logprobs_BxNxT, greedy.logprobs_BxNxT, atol=1e-6)


def test_forked_samples_share_the_prompt_prefix(tiny_cfg, tiny_params, greedy):
    out = _sample(tiny_cfg, tiny_params, PROMPTS, greedy=True, num_samples=3)
    assert out.tokens_BxNxT.shape == (3, 3, T)
    for n in range(3):
        np.testing.assert_array_equal(out.tokens_BxNxT[:, n], greedy.tokens_BxNxT[:, 0])
    tokens_BxP, lengths_B = sampler.pad_prompts(PROMPTS, 0)
    cache, logits_BxV = sampler.prefill(tiny_params, tiny_cfg, tokens_BxP, lengths_B, 16)
    forked = sampler.fork_cache(cache, 2)
    np.testing.assert_array_equal(forked.end_index, np.repeat(lengths_B, 2))
    for layer in range(tiny_cfg.num_layers):
        np.testing.assert_array_equal(forked.k[layer][2], forked.k[layer][3])
        np.testing.assert_array_equal(forked.v[layer][3], cache.v[layer][1])
    np.testing.assert_array_equal(sampler.fork_rows(logits_BxV, 2)[4], logits_BxV[2])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_temperature_one_log_softmax_of_the_model(tiny_cfg, tiny_params, temperature):
    out = _sample(
        tiny_cfg,
        tiny_params,
        PROMPTS,
        rng=jax.random.PRNGKey(3),
        num_samples=2,
        temperature=temperature,
    )
    width = 16
    for row, prompt in enumerate(PROMPTS):
        for n in range(2):
            sequence = prompt + [int(t) for t in out.tokens_BxNxT[row, n]]
            tokens_1xL = jnp.array([sequence + [0] * (width - len(sequence))], jnp.int32)
            logprobs_L = sampler.score(tiny_params, tiny_cfg, tokens_1xL)[0]
            expected_T = logprobs_L[len(prompt) : len(prompt) + T]
            np.testing.assert_allclose(out.logprobs_BxNxT[row, n], expected_T, atol=1e-5)
    assert not np.array_equal(out.tokens_BxNxT[:, 0], out.tokens_BxNxT[:, 1])


def test_score_masks_padding_and_segment_starts(tiny_cfg, tiny_params):
    tokens_1x6 = jnp.array([[4, 8, 15, 16, 23, 0]], jnp.int32)
    segments_1x6 = jnp.array([[1, 1, 1, 2, 2, 0]], jnp.int32)
    logprobs = np.asarray(sampler.score(tiny_params, tiny_cfg, tokens_1x6, segments_1x6))[0]
    assert logprobs[0] == logprobs[3] == logprobs[5] == 0.0
    assert (logprobs[[1, 2, 4]] < 0).all()


def test_decoding_continues_from_a_returned_cache(tiny_cfg, tiny_params, greedy):
    tokens_BxP, lengths_B = sampler.pad_prompts(PROMPTS, 0)
    cache, logits_BxV = sampler.prefill(tiny_params, tiny_cfg, tokens_BxP, lengths_B, 7 + 2 * T)
    rng = jax.random.PRNGKey(0)
    first = sampler.decode(
        tiny_params, tiny_cfg, cache, logits_BxV, rng, max_new_tokens=T // 2, greedy=True
    )
    second = sampler.decode(
        tiny_params,
        tiny_cfg,
        first.cache,
        first.last_logits_BxV,
        rng,
        max_new_tokens=T // 2,
        greedy=True,
    )
    np.testing.assert_array_equal(first.cache.end_index, lengths_B + T // 2)
    joined = np.concatenate([first.tokens_BxT, second.tokens_BxT], axis=1)
    np.testing.assert_array_equal(joined, greedy.tokens_BxNxT[:, 0])


def test_decoding_in_phases_equals_one_phase(tiny_cfg, tiny_params):
    """Cutting the cache to each phase's reach and regrowing it changes no token or cache."""
    tokens_BxP, lengths_B = sampler.pad_prompts(PROMPTS, 0)
    cache, logits_BxV = sampler.prefill(tiny_params, tiny_cfg, tokens_BxP, lengths_B, 7 + T)

    def run(phase_tokens, stop_tokens=()):
        return sampler.decode(
            tiny_params,
            tiny_cfg,
            cache,
            logits_BxV,
            jax.random.PRNGKey(3),
            max_new_tokens=T,
            stop_tokens=stop_tokens,
            phase_tokens=phase_tokens,
        )

    # Sampled at temperature 1, with a stop token that ends row 0 by step 5 and not row 1.
    stop = int(run(T).tokens_BxT[0, 4])
    one, phased = run(T, (stop,)), run(3, (stop,))  # phases end at steps 3, 6 and 8
    assert one.done_B[0] and not one.done_B[1]
    np.testing.assert_array_equal(phased.tokens_BxT, one.tokens_BxT)
    np.testing.assert_allclose(phased.logprobs_BxT, one.logprobs_BxT, atol=1e-6)
    np.testing.assert_array_equal(phased.lengths_B, one.lengths_B)
    np.testing.assert_array_equal(phased.done_B, one.done_B)
    np.testing.assert_allclose(phased.last_logits_BxV, one.last_logits_BxV, atol=1e-5)
    assert phased.cache.max_len == one.cache.max_len == 7 + T
    np.testing.assert_array_equal(phased.cache.end_index, one.cache.end_index)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), phased.cache, one.cache)


def test_filters_keep_only_allowed_tokens():
    probs_V = np.array([0.5, 0.3, 0.15, 0.05])
    logits_BxV = jnp.tile(jnp.log(jnp.asarray(probs_V, jnp.float32)), (4000, 1))
    rng = jax.random.PRNGKey(0)

    def draw(**kwargs):
        options = {"top_k": 0, "top_p": 1.0, "greedy": False, **kwargs}
        return np.asarray(sampler.choose_tokens(logits_BxV, rng, 1.0, **options))

    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 covers it
    assert set(draw(top_p=0.85)) == {0, 1, 2}
    frequencies_V = np.bincount(draw(), minlength=4) / 4000
    np.testing.assert_allclose(frequencies_V, probs_V, atol=0.03)


def test_first_argmax_and_draws_match_jax():
    rng = np.random.default_rng(0)
    # Small integers make ties common: the first maximum must win, as in jnp.argmax.
    x_BxV = jnp.asarray(rng.integers(0, 4, (256, 33)), jnp.float32)
    np.testing.assert_array_equal(sampler.first_argmax(x_BxV), jnp.argmax(x_BxV, axis=-1))
    nan_row = x_BxV.at[0, 5].set(jnp.nan)
    assert 0 <= int(sampler.first_argmax(nan_row)[0]) < 33  # a valid token id, never V
    logits_BxV = jnp.asarray(rng.standard_normal((512, 64)), jnp.float32)
    key = jax.random.PRNGKey(3)
    drawn = sampler.choose_tokens(logits_BxV, key, 1.0, top_k=0, top_p=1.0, greedy=False)
    np.testing.assert_array_equal(drawn, jax.random.categorical(key, logits_BxV, axis=-1))


def test_sample_rejects_bad_requests(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="empty"):
        _sample(tiny_cfg, tiny_params, [[1, 2], []])
    with pytest.raises(ValueError, match="max_seq_len"):
        _sample(tiny_cfg, tiny_params, [[1] * 125])
    with pytest.raises(ValueError, match="top_p"):
        _sample(tiny_cfg, tiny_params, PROMPTS, top_p=0.0)
