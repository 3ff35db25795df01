"""The decoder: shapes, causality, packing, layer stacking, dtypes, heads, KV cache, RoPE."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import config, transformer
from model.transformer import Transformer


def _tokens(shape, seed=0, vocab=128):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, vocab, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(cfg, params, tokens, positions_BxL=None, segment_ids_BxL=None):
    return Transformer(cfg).apply({"params": params}, tokens, positions_BxL, segment_ids_BxL)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grad_of_mean_square(cfg, params, tokens):
    return jax.grad(lambda p: jnp.mean(_logits(cfg, p, tokens) ** 2))(params)


@functools.partial(jax.jit, static_argnames=("cfg", "heads", "compute_logits"))
def _forward(cfg, params, tokens, heads=(), segment_ids_BxL=None, cache=None, compute_logits=True):
    return Transformer(cfg, heads).apply(
        {"params": params},
        tokens,
        segment_ids_BxL=segment_ids_BxL,
        cache=cache,
        compute_logits=compute_logits,
        method="forward",
    )


def test_forward_shapes_and_dtypes(tiny_cfg, tiny_params):
    tokens_BxL = _tokens((2, 8))
    logits_BxLxV = _logits(tiny_cfg, tiny_params, tokens_BxL)
    assert logits_BxLxV.shape == (2, 8, tiny_cfg.vocab_size)
    assert logits_BxLxV.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits_BxLxV)).all()
    out = _forward(tiny_cfg, tiny_params, tokens_BxL, compute_logits=False)
    assert out.logits is None and out.cache is None and out.scores == {}
    assert out.hidden_BxLxD.shape == (2, 8, tiny_cfg.d_model)


def test_logits_at_t_do_not_depend_on_later_tokens(tiny_cfg, tiny_params):
    L = 8
    tokens_1xL = jnp.arange(3, 3 + L, dtype=jnp.int32)[None]  # distinct ids: one row per position

    def logits_at(embedding, t):
        params = {**tiny_params, "embed": {"embedding": embedding}}
        return _logits(tiny_cfg, params, tokens_1xL)[0, t].sum()

    grad_fn = jax.jit(jax.grad(logits_at))
    for t in (0, 3, 6):
        grad_VxD = grad_fn(tiny_params["embed"]["embedding"], t)
        norms_L = np.linalg.norm(np.asarray(grad_VxD)[np.asarray(tokens_1xL[0])], axis=-1)
        assert (norms_L[t + 1 :] == 0).all()
        assert (norms_L[: t + 1] > 0).all()


def test_packed_segments_equal_separate_runs(tiny_cfg, tiny_params):
    a, b = _tokens((1, 5), seed=1), _tokens((1, 7), seed=2)
    packed_1x16 = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments_1x16 = jnp.array([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
    positions_1x16 = jnp.array([list(range(5)) + list(range(7)) + list(range(4))], jnp.int32)
    packed = _logits(tiny_cfg, tiny_params, packed_1x16, segment_ids_BxL=segments_1x16)
    explicit = _logits(
        tiny_cfg,
        tiny_params,
        packed_1x16,
        segment_ids_BxL=segments_1x16,
        positions_BxL=positions_1x16,
    )
    np.testing.assert_array_equal(packed, explicit)
    np.testing.assert_allclose(packed[:, :5], _logits(tiny_cfg, tiny_params, a), atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:12], _logits(tiny_cfg, tiny_params, b), atol=1e-5)


@pytest.mark.parametrize("L", [70, 130])  # 2 blocks of 35; 4 uneven blocks of 32-33
def test_block_causal_attention_equals_full_attention(L):
    """Skipping the key blocks above the diagonal changes no value or gradient."""
    B, K, G, Dh = 2, 2, 3, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, L, K, G, Dh))
    k = jax.random.normal(keys[1], (B, K, L, Dh))
    v = jax.random.normal(keys[2], (B, K, Dh, L))  # values transposed, as attend takes them
    # Row 0 packs three segments and right padding; row 1 holds one sequence.
    bounds = np.linspace(0, L - 5, 4).astype(int)
    segments_BxL = np.ones((B, L), np.int32)
    segments_BxL[0] = np.searchsorted(bounds[1:], np.arange(L), side="right") + 1
    segments_BxL[0, L - 5 :] = 0
    causal_LxL = np.tril(np.ones((L, L), bool))
    mask_BxLxL = jnp.asarray(causal_LxL & (segments_BxL[:, :, None] == segments_BxL[:, None, :]))

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask_BxLxL)))

    def value_and_grads(fn):
        # Jitted: op by op, the blocks' dozens of small ops took ~20 s to dispatch.
        return jax.jit(jax.value_and_grad(functools.partial(loss, fn), (0, 1, 2)))(q, k, v)

    full = value_and_grads(transformer.attend)
    blocks = value_and_grads(transformer.attend_causal)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(blocks), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_segment_positions_restart_per_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    expected = [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    np.testing.assert_array_equal(transformer.segment_positions(segments), expected)


def test_scanned_and_looped_layers_agree(tiny_cfg, tiny_params):
    loop_cfg = dataclasses.replace(tiny_cfg, scan_layers=False)
    looped = transformer.unstack_layers(tiny_params)
    assert "layers" not in looped and looped["layers_1"]["attn"]["q"]["kernel"].shape == (32, 4, 8)
    fresh = jax.eval_shape(transformer.init_params, loop_cfg, jax.random.PRNGKey(1))
    assert jax.tree.structure(fresh) == jax.tree.structure(looped)
    tokens_BxL = _tokens((2, 8))
    np.testing.assert_allclose(
        _logits(loop_cfg, looped, tokens_BxL),
        _logits(tiny_cfg, tiny_params, tokens_BxL),
        atol=1e-5,
    )
    restacked = transformer.stack_layers(looped)
    jax.tree.map(np.testing.assert_array_equal, restacked, tiny_params)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_keeps_gradients(tiny_cfg, tiny_params, remat):
    tokens_BxL = _tokens((2, 8))
    expected = _grad_of_mean_square(tiny_cfg, tiny_params, tokens_BxL)
    got = _grad_of_mean_square(dataclasses.replace(tiny_cfg, remat=remat), tiny_params, tokens_BxL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got, expected)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_attention_path_matches_einsum(tiny_cfg, tiny_params, packed):
    """attention="xla" runs the jax.nn.dot_product_attention call that "cudnn" makes on a GPU:
    same head grouping, causality from the kernel, packing from the mask."""
    fused_cfg = dataclasses.replace(tiny_cfg, attention="xla")
    tokens_BxL = _tokens((2, 12), seed=3)
    segments_BxL = None
    if packed:
        segments_BxL = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)

    def loss(cfg, params):
        logits_BxLxV = Transformer(cfg).apply({"params": params}, tokens_BxL, None, segments_BxL)
        return jnp.mean(logits_BxLxV**2), logits_BxLxV

    grad_fn = jax.jit(jax.grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (expected_grads, expected_logits), (got_grads, got_logits) = (
        grad_fn(cfg, tiny_params) for cfg in (tiny_cfg, fused_cfg)
    )
    np.testing.assert_allclose(got_logits, expected_logits, atol=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got_grads, expected_grads
    )


def test_bfloat16_compute_is_close_to_float32(tiny_cfg, tiny_params):
    tokens_BxL = _tokens((2, 8))
    bf16_cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
    full = _logits(tiny_cfg, tiny_params, tokens_BxL)
    half = _logits(bf16_cfg, tiny_params, tokens_BxL)
    assert half.dtype == jnp.float32
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(half - full).max()) < 0.05 * scale
    assert float(jnp.mean(jnp.argmax(half, -1) == jnp.argmax(full, -1))) > 0.9
    cache = transformer.init_cache(bf16_cfg, 2, 16)
    assert all(a.dtype == jnp.bfloat16 for a in (*cache.k, *cache.v))


def test_value_head_starts_at_zero_and_reward_head_does_not(tiny_cfg, tiny_params):
    # A zero value head makes PPO's first advantages the returns rather than the head's noise.
    params = transformer.add_heads(
        tiny_params, tiny_cfg, ("value", "reward"), jax.random.PRNGKey(3)
    )
    assert not np.any(params["value_head"]["kernel"])
    assert np.std(params["reward_head"]["kernel"]) > 0
    out = _forward(tiny_cfg, params, _tokens((2, 8)), heads=("value", "reward"))
    np.testing.assert_array_equal(out.scores["value"], 0.0)
    created = transformer.init_params(tiny_cfg, jax.random.PRNGKey(0), ("value",))
    assert not np.any(created["value_head"]["kernel"])


def test_scalar_heads_can_be_added_and_dropped(tiny_cfg, tiny_params):
    heads = ("value", "reward")
    params = transformer.add_heads(tiny_params, tiny_cfg, heads, jax.random.PRNGKey(3))
    assert params["value_head"]["kernel"].shape == (tiny_cfg.d_model, 1)
    assert params["reward_head"]["bias"].shape == (1,)
    tokens_BxL = _tokens((2, 8))
    out = _forward(tiny_cfg, params, tokens_BxL, heads=heads)
    np.testing.assert_array_equal(out.logits, _logits(tiny_cfg, tiny_params, tokens_BxL))
    for name in heads:
        head = params[f"{name}_head"]
        expected_BxL = (out.hidden_BxLxD @ head["kernel"])[..., 0] + head["bias"][0]
        assert out.scores[name].shape == (2, 8) and out.scores[name].dtype == jnp.float32
        np.testing.assert_allclose(out.scores[name], expected_BxL, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.scores["value"], out.scores["reward"])

    assert transformer.drop_heads(params).keys() == tiny_params.keys()
    assert set(transformer.drop_heads(params, ("value",))) == set(tiny_params) | {"reward_head"}
    with pytest.raises(ValueError, match="already have"):
        transformer.add_heads(params, tiny_cfg, ("value",), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="scalar head name"):
        transformer.add_heads(tiny_params, tiny_cfg, ("Value!",), jax.random.PRNGKey(0))
    created = jax.eval_shape(transformer.init_params, tiny_cfg, jax.random.PRNGKey(0), ("value",))
    assert set(created) == set(tiny_params) | {"value_head"}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cache_in_chunks_equals_full_forward(tiny_cfg, tiny_params, scan_layers):
    # The cached forward runs the layers unrolled either way (stacked params are sliced).
    cfg = dataclasses.replace(tiny_cfg, scan_layers=scan_layers)
    params = tiny_params if scan_layers else transformer.unstack_layers(tiny_params)
    tokens_BxL = _tokens((2, 10), seed=4)
    full_BxLxV = _logits(tiny_cfg, tiny_params, tokens_BxL)
    cache = transformer.init_cache(cfg, 2, 16)
    chunks = []
    for start, stop in [(0, 4), (4, 7), (7, 8), (8, 10)]:
        out = _forward(cfg, params, tokens_BxL[:, start:stop], cache=cache)
        cache = out.cache
        chunks.append(out.logits)
    np.testing.assert_array_equal(cache.end_index, [10, 10])
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full_BxLxV, atol=1e-5)


def test_cache_with_right_padded_rows_keeps_per_row_positions(tiny_cfg, tiny_params):
    seq_a, seq_b = _tokens((1, 8), seed=5), _tokens((1, 8), seed=6)
    # Row 0 has a 5-token prompt, row 1 a 3-token prompt padded to 5.
    prompts_2x5 = jnp.concatenate([seq_a[:, :5], seq_b[:, :5].at[:, 3:].set(0)])
    segments_2x5 = jnp.array([[1] * 5, [1, 1, 1, 0, 0]], jnp.int32)
    cache = transformer.init_cache(tiny_cfg, 2, 16)
    out = _forward(tiny_cfg, tiny_params, prompts_2x5, segment_ids_BxL=segments_2x5, cache=cache)
    np.testing.assert_array_equal(out.cache.end_index, [5, 3])
    # Next token per row: a[5] at position 5, b[3] at position 3.
    step_2x1 = jnp.array([[seq_a[0, 5]], [seq_b[0, 3]]], jnp.int32)
    step = _forward(tiny_cfg, tiny_params, step_2x1, cache=out.cache)
    np.testing.assert_allclose(
        step.logits[0, 0], _logits(tiny_cfg, tiny_params, seq_a[:, :6])[0, 5], atol=1e-5
    )
    np.testing.assert_allclose(
        step.logits[1, 0], _logits(tiny_cfg, tiny_params, seq_b[:, :4])[0, 3], atol=1e-5
    )
    with pytest.raises(ValueError, match="positions come from cache"):
        Transformer(tiny_cfg).apply(
            {"params": tiny_params},
            step_2x1,
            positions_BxL=step_2x1,
            cache=out.cache,
            method="forward",
        )


def test_rope_scores_depend_only_on_relative_position(tiny_cfg):
    inv_freq = transformer.rope_frequencies(tiny_cfg)
    q_1x1x1xDh, k_1x1x1xDh = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 1, 8))

    def score(m, n):
        q = transformer.apply_rope(q_1x1x1xDh, jnp.array([[m]]), inv_freq)
        k = transformer.apply_rope(k_1x1x1xDh, jnp.array([[n]]), inv_freq)
        return float(jnp.sum(q * k))

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    rotated = transformer.apply_rope(q_1x1x1xDh, jnp.array([[5]]), inv_freq)
    assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(q_1x1x1xDh)))


def test_rope_pairs_dims_like_hugging_face_rotate_half(tiny_cfg):
    inv_freq = transformer.rope_frequencies(tiny_cfg)
    x_1x3x2xDh = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 2, 8))
    positions_1x3 = jnp.array([[0, 4, 9]])
    # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos = cat(f, f).
    freqs = positions_1x3[..., None] * inv_freq
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None]
    rotate_half = jnp.concatenate([-x_1x3x2xDh[..., 4:], x_1x3x2xDh[..., :4]], -1)
    expected = x_1x3x2xDh * cos + rotate_half * sin
    np.testing.assert_allclose(
        transformer.apply_rope(x_1x3x2xDh, positions_1x3, inv_freq), expected, atol=1e-6
    )


def test_llama3_rope_scaling_slows_only_long_wavelengths():
    cfg = config.get_preset("tiny", head_dim=128, rope_theta=500000.0)
    scaled_cfg = dataclasses.replace(cfg, rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192))
    plain, scaled = transformer.rope_frequencies(cfg), transformer.rope_frequencies(scaled_cfg)
    wavelen = 2 * np.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8.0, rtol=1e-6)
    between = ~short & ~long
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all()


def test_token_surprise_is_the_negative_log_prob_of_each_next_token():
    logits_BxLxV = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
    tokens_BxL = jnp.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    segment_ids_BxL = jnp.array([[1, 1, 2, 2, 2], [1, 1, 1, 0, 0]])
    surprise_BxL = transformer.token_surprise(logits_BxLxV, tokens_BxL, segment_ids_BxL)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    expected = np.zeros((2, 5), np.float32)
    for b in range(2):
        for t in range(1, 5):
            same = segment_ids_BxL[b, t] == segment_ids_BxL[b, t - 1] != 0
            if same:  # predicted at t - 1; a segment's first token and padding stay 0
                expected[b, t] = -logp_BxLxV[b, t - 1, tokens_BxL[b, t]]
    np.testing.assert_allclose(surprise_BxL, expected, rtol=1e-5, atol=1e-6)
    assert expected[0, 2] == 0 and expected[0, 3] > 0 and expected[1, 3] == 0


def test_window_max_looks_back_within_its_segment():
    x_BxL = jnp.array([[1.0, 0, 0, 5, 0, 0, 0, 0, 2, 0]])
    segment_ids_BxL = jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    got = transformer.window_max(x_BxL, segment_ids_BxL, 3)
    np.testing.assert_array_equal(got, [[1, 1, 1, 5, 5, 5, 0, 0, 2, 2]])
    np.testing.assert_array_equal(transformer.window_max(x_BxL, segment_ids_BxL, 1), x_BxL)
    wide = transformer.window_max(x_BxL, segment_ids_BxL, 64)  # longer than the row
    np.testing.assert_array_equal(wide, [[1, 1, 1, 5, 5, 5, 0, 0, 2, 2]])


def test_window_max_by_doubling_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    x_BxL = rng.exponential(size=(3, 23)).astype(np.float32)
    # Contiguous segments of random lengths, then padding (segment 0).
    segment_ids_BxL = np.cumsum(rng.random((3, 23)) < 0.15, axis=1) + 1
    segment_ids_BxL[:, 19:] = 0
    for window in (1, 2, 3, 5, 7, 8, 13, 16, 22, 23, 40):
        got = np.asarray(transformer.window_max(x_BxL, segment_ids_BxL, window))
        expected = np.zeros_like(x_BxL)
        for b in range(3):
            for t in range(23):
                back = [
                    j
                    for j in range(max(0, t - window + 1), t + 1)
                    if segment_ids_BxL[b, j] == segment_ids_BxL[b, t]
                ]
                expected[b, t] = x_BxL[b, back].max()
        np.testing.assert_array_equal(got, expected, err_msg=f"window {window}")


def test_reward_head_subtracts_scaled_recent_surprise(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, reward_surprise_window=3)
    params = transformer.add_heads(tiny_params, cfg, ("reward", "value"), jax.random.PRNGKey(3))
    head = params["reward_head"]
    # It starts as the surprise alone: a zero linear term and a scale of 1.
    assert head["linear"]["kernel"].shape == (cfg.d_model, 1)
    assert not np.any(head["linear"]["kernel"])
    np.testing.assert_allclose(jax.nn.softplus(head["surprise_scale"]), [1.0], rtol=1e-6)
    head["linear"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4), (cfg.d_model, 1))
    head["surprise_scale"] = jnp.array([0.4])
    tokens_BxL = _tokens((2, 9))
    segment_ids_BxL = jnp.array([[1] * 9, [1] * 4 + [2] * 5])
    out = _forward(
        cfg, params, tokens_BxL, ("reward", "value"), segment_ids_BxL, compute_logits=False
    )
    assert out.logits is None  # computed for the surprise, not returned
    logits_BxLxV = _forward(cfg, params, tokens_BxL, (), segment_ids_BxL).logits
    recent_BxL = transformer.window_max(
        transformer.token_surprise(logits_BxLxV, tokens_BxL, segment_ids_BxL), segment_ids_BxL, 3
    )
    linear_BxL = (out.hidden_BxLxD @ head["linear"]["kernel"])[..., 0] + head["linear"]["bias"]
    expected_BxL = linear_BxL - jax.nn.softplus(0.4) * recent_BxL
    np.testing.assert_allclose(out.scores["reward"], expected_BxL, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(recent_BxL)) > 1.0  # a random model is surprised: the term matters
    value = params["value_head"]  # other heads stay linear
    np.testing.assert_allclose(
        out.scores["value"],
        (out.hidden_BxLxD @ value["kernel"])[..., 0] + value["bias"],
        rtol=1e-5,
        atol=1e-6,
    )
    # A response mask keeps the prompt's surprise out: here the first 5 tokens of each row.
    response_mask_BxL = jnp.array([[0] * 5 + [1] * 4, [0] * 5 + [1] * 4])
    masked = transformer.Transformer(cfg, heads=("reward",)).apply(
        {"params": params},
        tokens_BxL,
        segment_ids_BxL=segment_ids_BxL,
        response_mask_BxL=response_mask_BxL,
        method="forward",
    )
    surprise_BxL = transformer.token_surprise(logits_BxLxV, tokens_BxL, segment_ids_BxL)
    recent_response_BxL = transformer.window_max(
        jnp.where(response_mask_BxL != 0, surprise_BxL, 0.0), segment_ids_BxL, 3
    )
    np.testing.assert_allclose(
        masked.scores["reward"],
        linear_BxL - jax.nn.softplus(0.4) * recent_response_BxL,
        rtol=1e-5,
        atol=1e-5,
    )
    assert not np.allclose(masked.scores["reward"], out.scores["reward"])
    cache = transformer.init_cache(cfg, 2, 16)
    with pytest.raises(ValueError, match="score whole sequences without a cache"):
        _forward(cfg, params, tokens_BxL, ("reward",), cache=cache)
    with pytest.raises(ValueError, match="reward_surprise_window"):
        dataclasses.replace(cfg, reward_surprise_window=-1)
