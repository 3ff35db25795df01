"""model.hf: HF Llama checkpoints load, match an independent NumPy HF forward, and round-trip."""

import json
import logging

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from model import hf
from model.transformer import Transformer, init_params

V, D, Y, H, K, DH, F = 64, 32, 2, 4, 2, 8, 64
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With Dh=8 and theta=1e4 the four wavelengths (6, 63, 628, 6283) fall in the high,
    # medium and low bands of llama3 scaling, so every branch of it matters.
    "original_max_position_embeddings": 64,
}


# ------------------------------------------------------------------ tiny HF-layout checkpoints


def _hf_config(*, new_style: bool, tied: bool, theta: float = 10000.0, llama3: bool = False):
    """config.json as transformers 4.x (new_style=False) or 5.x writes it."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": Y,
        "num_attention_heads": H,
        "num_key_value_heads": K,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if new_style:
        rope = {"rope_theta": theta, **(LLAMA3 if llama3 else {"rope_type": "default"})}
        config.update(head_dim=DH, rope_parameters=rope, dtype="float32")
    else:
        config.update(rope_theta=theta, rope_scaling=LLAMA3 if llama3 else None)
        config["torch_dtype"] = "float32"
    return config


def _hf_tensors(seed: int, *, tied: bool) -> dict[str, np.ndarray]:
    """Random float32 weights named and shaped exactly as LlamaForCausalLM saves them."""
    rng = np.random.default_rng(seed)

    def linear(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm():
        return (1.0 + 0.2 * rng.standard_normal(D)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32)}
    for i in range(Y):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = norm()
        tensors[pre + "self_attn.q_proj.weight"] = linear(H * DH, D)
        tensors[pre + "self_attn.k_proj.weight"] = linear(K * DH, D)
        tensors[pre + "self_attn.v_proj.weight"] = linear(K * DH, D)
        tensors[pre + "self_attn.o_proj.weight"] = linear(D, H * DH)
        tensors[pre + "post_attention_layernorm.weight"] = norm()
        tensors[pre + "mlp.gate_proj.weight"] = linear(F, D)
        tensors[pre + "mlp.up_proj.weight"] = linear(F, D)
        tensors[pre + "mlp.down_proj.weight"] = linear(D, F)
    tensors["model.norm.weight"] = norm()
    if not tied:
        tensors["lm_head.weight"] = linear(V, D)
    return tensors


def _write(path, config, tensors, *, num_shards: int = 1, dtype=np.float32):
    """Writes config.json and one model.safetensors or num_shards shards plus the index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {name: t.astype(dtype) for name, t in tensors.items()}
    if num_shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for n, chunk in enumerate(np.array_split(np.array(names), num_shards)):
        file = f"model-{n + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({name: tensors[name] for name in chunk}, path / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in chunk})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


# --------------------------------------------------- independent NumPy forward pass of HF Llama


def _inv_freq(theta: float, llama3: dict | None) -> np.ndarray:
    """RoPE inverse frequencies as transformers computes them, with llama3 scaling."""
    inv = 1.0 / theta ** (np.arange(0, DH, 2, dtype=np.float64) / DH)
    if llama3 is None:
        return inv
    factor, low, high = llama3["factor"], llama3["low_freq_factor"], llama3["high_freq_factor"]
    old_len = llama3["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _reference_logits(t, tokens_BxL, *, theta, llama3, tied, eps=1e-5):
    """LlamaForCausalLM.forward in float64 NumPy, written from the transformers source."""
    t = {name: w.astype(np.float64) for name, w in t.items()}
    B, L = tokens_BxL.shape
    freqs_LxDh2 = np.arange(L)[:, None] * _inv_freq(theta, llama3)[None, :]
    angles_LxDh = np.concatenate([freqs_LxDh2, freqs_LxDh2], axis=-1)
    cos_LxDh, sin_LxDh = np.cos(angles_LxDh), np.sin(angles_LxDh)
    causal_LxL = np.tril(np.ones((L, L), dtype=bool))
    x_BxLxD = t["model.embed_tokens.weight"][tokens_BxL]
    for i in range(Y):
        pre = f"model.layers.{i}."
        h_BxLxD = _rms_norm(x_BxLxD, t[pre + "input_layernorm.weight"], eps)

        def heads(name, n, h_BxLxD=h_BxLxD, pre=pre):
            proj = h_BxLxD @ t[pre + f"self_attn.{name}_proj.weight"].T
            return proj.reshape(B, L, n, DH).transpose(0, 2, 1, 3)

        q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh = heads("q", H), heads("k", K), heads("v", K)
        q_BxHxLxDh = q_BxHxLxDh * cos_LxDh + _rotate_half(q_BxHxLxDh) * sin_LxDh
        k_BxKxLxDh = k_BxKxLxDh * cos_LxDh + _rotate_half(k_BxKxLxDh) * sin_LxDh
        # repeat_kv: query head h reads key/value head h // (H // K).
        k_BxHxLxDh = np.repeat(k_BxKxLxDh, H // K, axis=1)
        v_BxHxLxDh = np.repeat(v_BxKxLxDh, H // K, axis=1)
        scores_BxHxLxL = q_BxHxLxDh @ k_BxHxLxDh.transpose(0, 1, 3, 2) / np.sqrt(DH)
        scores_BxHxLxL = np.where(causal_LxL, scores_BxHxLxL, -np.inf)
        probs_BxHxLxL = np.exp(scores_BxHxLxL - scores_BxHxLxL.max(axis=-1, keepdims=True))
        probs_BxHxLxL /= probs_BxHxLxL.sum(axis=-1, keepdims=True)
        attn_BxLxHDh = (probs_BxHxLxL @ v_BxHxLxDh).transpose(0, 2, 1, 3).reshape(B, L, H * DH)
        x_BxLxD = x_BxLxD + attn_BxLxHDh @ t[pre + "self_attn.o_proj.weight"].T
        h_BxLxD = _rms_norm(x_BxLxD, t[pre + "post_attention_layernorm.weight"], eps)
        gate_BxLxF = h_BxLxD @ t[pre + "mlp.gate_proj.weight"].T
        up_BxLxF = h_BxLxD @ t[pre + "mlp.up_proj.weight"].T
        silu_BxLxF = gate_BxLxF / (1.0 + np.exp(-gate_BxLxF))
        x_BxLxD = x_BxLxD + (silu_BxLxF * up_BxLxF) @ t[pre + "mlp.down_proj.weight"].T
    x_BxLxD = _rms_norm(x_BxLxD, t["model.norm.weight"], eps)
    head_VxD = t["model.embed_tokens.weight"] if tied else t["lm_head.weight"]
    return x_BxLxD @ head_VxD.T


def _tokens(seed: int = 0, batch: int = 2, length: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (batch, length)).astype(np.int32)


def _model_logits(cfg, params, tokens_BxL) -> np.ndarray:
    return np.asarray(Transformer(cfg).apply({"params": params}, tokens_BxL))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "new_style, tied, llama3, num_shards, scan_layers",
    [
        (False, False, False, 1, True),  # old config.json, single file, untied
        (True, True, True, 3, False),  # rope_parameters + llama3, sharded, tied, unscanned
        (False, False, True, 2, True),  # legacy rope_scaling llama3, sharded
    ],
)
def test_logits_match_numpy_reference(tmp_path, new_style, tied, llama3, num_shards, scan_layers):
    tensors = _hf_tensors(seed=1, tied=tied)
    config = _hf_config(new_style=new_style, tied=tied, llama3=llama3)
    _write(tmp_path, config, tensors, num_shards=num_shards)

    cfg, params = hf.load_llama(tmp_path, scan_layers=scan_layers)

    assert (cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings) == (DH, K, tied)
    assert cfg.rope_scaling == (("llama3", 8.0, 1.0, 4.0, 64) if llama3 else None)
    assert ("layers" in params) == scan_layers and ("lm_head" in params) != tied
    tokens = _tokens()
    expected = _reference_logits(
        tensors, tokens, theta=10000.0, llama3=LLAMA3 if llama3 else None, tied=tied
    )
    logits = _model_logits(cfg, params, tokens)
    assert logits.shape == (2, 12, V) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_reference_is_sensitive_to_rope_scaling():
    # Guards the test above: llama3 scaling must change the logits at these lengths.
    tensors, tokens = _hf_tensors(seed=1, tied=False), _tokens()
    plain = _reference_logits(tensors, tokens, theta=10000.0, llama3=None, tied=False)
    scaled = _reference_logits(tensors, tokens, theta=10000.0, llama3=LLAMA3, tied=False)
    assert np.abs(plain - scaled).max() > 1e-2


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    tensors = _hf_tensors(seed=2, tied=False)
    _write(tmp_path, _hf_config(new_style=True, tied=False), tensors, dtype=ml_dtypes.bfloat16)
    with safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"

    cfg, params = hf.load_llama(tmp_path)

    rounded = {name: t.astype(ml_dtypes.bfloat16).astype(np.float32) for name, t in tensors.items()}
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    np.testing.assert_array_equal(
        params["embed"]["embedding"], rounded["model.embed_tokens.weight"]
    )
    tokens = _tokens(seed=3)
    expected = _reference_logits(rounded, tokens, theta=10000.0, llama3=None, tied=False)
    np.testing.assert_allclose(_model_logits(cfg, params, tokens), expected, atol=1e-4, rtol=1e-4)


def test_load_in_bfloat16_casts_params(tmp_path):
    _write(tmp_path, _hf_config(new_style=True, tied=True), _hf_tensors(seed=2, tied=True))
    cfg, params = hf.load_llama(tmp_path, dtype="bfloat16", max_seq_len=32)
    assert (cfg.dtype, cfg.param_dtype, cfg.max_seq_len) == ("bfloat16", "bfloat16", 32)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_tied_checkpoint_with_redundant_lm_head_loads(tmp_path):
    tensors = _hf_tensors(seed=4, tied=False)  # has lm_head.weight although config says tied
    _write(tmp_path, _hf_config(new_style=False, tied=True), tensors)
    cfg, params = hf.load_llama(tmp_path)
    assert cfg.tie_embeddings and "lm_head" not in params


def test_config_forms_are_read_alike():
    old = _hf_config(new_style=False, tied=False, theta=500000.0, llama3=True)
    new = _hf_config(new_style=True, tied=False, theta=500000.0, llama3=True)
    assert hf.config_from_hf(old) == hf.config_from_hf(new)
    cfg = hf.config_from_hf(new)
    assert (cfg.rope_theta, cfg.head_dim, cfg.max_seq_len, cfg.norm_eps) == (5e5, DH, 128, 1e-5)

    legacy = {**old, "rope_scaling": {**LLAMA3, "type": "llama3"}}
    del legacy["rope_scaling"]["rope_type"], legacy["num_key_value_heads"]
    cfg = hf.config_from_hf(legacy)
    assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64) and cfg.num_kv_heads == H


def test_qwen2_zero_biases_load_and_nonzero_biases_are_rejected(tmp_path):
    config = {**_hf_config(new_style=False, tied=True), "model_type": "qwen2"}
    tensors = _hf_tensors(seed=5, tied=True)
    for i in range(Y):
        for name, n in (("q", H), ("k", K), ("v", K)):
            tensors[f"model.layers.{i}.self_attn.{name}_proj.bias"] = np.zeros(n * DH, np.float32)
    cfg, _ = hf.load_llama(_write(tmp_path / "zero", config, tensors))
    assert cfg.tie_embeddings

    tensors["model.layers.1.self_attn.k_proj.bias"][3] = 0.5
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf.load_llama(_write(tmp_path / "nonzero", config, tensors))


def test_mistral_sliding_window_warns():
    config = {**_hf_config(new_style=False, tied=False), "model_type": "mistral"}
    with pytest.warns(UserWarning, match="sliding_window=4096"):
        hf.config_from_hf({**config, "sliding_window": 4096})
    qwen = {**config, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    hf.config_from_hf(qwen)  # Qwen2 leaves the window off by default: no warning.


# ------------------------------------------------------------------------------------ errors


def test_missing_directory_and_files_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_llama(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_llama(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(
        json.dumps(_hf_config(new_style=True, tied=False))
    )
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_llama(tmp_path / "empty")

    config, tensors = _hf_config(new_style=True, tied=False), _hf_tensors(seed=6, tied=False)
    sharded = _write(tmp_path / "sharded", config, tensors, num_shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        hf.load_llama(sharded)


def test_missing_tensor_and_wrong_shape_name_tensor_and_expected_shape(tmp_path):
    config = _hf_config(new_style=True, tied=False)
    tensors = _hf_tensors(seed=7, tied=False)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[64, 32\]"):
        hf.load_llama(_write(tmp_path / "missing", config, tensors))

    tensors = _hf_tensors(seed=7, tied=False)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((H * DH, D), np.float32)
    with pytest.raises(ValueError, match=r"k_proj\.weight in model\.safetensors.*\[16, 32\]"):
        hf.load_llama(_write(tmp_path / "shape", config, tensors))


def test_unsupported_configs_are_rejected():
    base = _hf_config(new_style=True, tied=False)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        hf.config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        hf.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_size"):
        hf.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(TypeError, match="no_such_field"):
        hf.config_from_hf(base, no_such_field=1)


def test_unknown_tensors_are_rejected(tmp_path):
    tensors = _hf_tensors(seed=8, tied=False)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(DH, np.float32)  # Qwen3-style
    with pytest.raises(ValueError, match=r"q_norm\.weight"):
        hf.load_llama(_write(tmp_path, _hf_config(new_style=True, tied=False), tensors))


# ------------------------------------------------------------------------ saving, round trip


@pytest.mark.parametrize("scan_layers, tied", [(True, False), (False, True)])
def test_save_round_trip_reproduces_hf_tensors_and_params(tmp_path, scan_layers, tied):
    tensors = _hf_tensors(seed=9, tied=tied)
    source = _write(tmp_path / "src", _hf_config(new_style=False, tied=tied, llama3=True), tensors)
    cfg, params = hf.load_llama(source, scan_layers=scan_layers)

    max_bytes = 20_000
    hf.save_llama(cfg, params, tmp_path / "out", max_shard_bytes=max_bytes, eos_token_id=2)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    saved = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(tmp_path / "out" / file, framework="np") as f:
            assert f.metadata() == {"format": "pt"}
            shard = {name: f.get_tensor(name) for name in f.keys()}
        assert len(shard) == 1 or sum(t.nbytes for t in shard.values()) <= max_bytes
        saved.update(shard)
    for name, tensor in tensors.items():
        assert saved[name].dtype == np.float32
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["model_type"] == "llama"
    assert (written["head_dim"], written["num_key_value_heads"]) == (DH, K)
    assert written["eos_token_id"] == 2 and written["torch_dtype"] == "float32"
    assert written["rope_scaling"] == LLAMA3 and "bos_token_id" not in written
    cfg_again, params_again = hf.load_llama(tmp_path / "out", scan_layers=scan_layers)
    assert cfg_again == cfg
    _assert_trees_equal(params_again, params)


def test_resaving_as_one_file_replaces_old_shards(tmp_path, caplog):
    tensors = _hf_tensors(seed=10, tied=False)
    config = _hf_config(new_style=True, tied=False)
    cfg, params = hf.load_llama(_write(tmp_path / "src", config, tensors))
    hf.save_llama(cfg, params, tmp_path / "out", max_shard_bytes=20_000)
    params_with_head = {**params, "value_head": {"kernel": np.zeros((D, 1), np.float32)}}
    with caplog.at_level(logging.INFO, logger="model.hf"):
        hf.save_llama(cfg, params_with_head, tmp_path / "out")
    assert "value_head" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    _, params_again = hf.load_llama(tmp_path / "out")
    _assert_trees_equal(params_again, params)


def test_save_rejects_params_that_do_not_match_config(tmp_path):
    tensors = _hf_tensors(seed=11, tied=False)
    config = _hf_config(new_style=True, tied=False)
    cfg, params = hf.load_llama(_write(tmp_path / "src", config, tensors))
    bad = {**params, "final_norm": {"scale": np.ones(D + 1, np.float32)}}
    with pytest.raises(ValueError, match=r"final_norm/scale has shape \[33\].*\[32\]"):
        hf.save_llama(cfg, bad, tmp_path / "out")


def test_transformer_init_params_survive_save_and_load(tmp_path):
    # Checks the model's own parameter tree is the one hf.py reads and writes.
    cfg = hf.config_from_hf(_hf_config(new_style=True, tied=False))
    params = init_params(cfg, jax.random.key(0))  # jax.Arrays, as training holds them
    hf.save_llama(cfg, params, tmp_path)
    cfg_again, params_again = hf.load_llama(tmp_path)
    assert cfg_again == cfg
    _assert_trees_equal(params_again, params)


# ---------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("tied", [False, True])
def test_resize_embeddings_appends_mean_rows(tmp_path, tied):
    tensors = _hf_tensors(seed=12, tied=tied)
    cfg, params = hf.load_llama(_write(tmp_path, _hf_config(new_style=True, tied=tied), tensors))

    new_cfg, new_params = hf.resize_embeddings(cfg, params, V + 6)

    assert new_cfg.vocab_size == V + 6 and cfg.vocab_size == V
    embedding = np.asarray(new_params["embed"]["embedding"])
    assert embedding.shape == (V + 6, D)
    np.testing.assert_array_equal(embedding[:V], tensors["model.embed_tokens.weight"])
    mean_D = tensors["model.embed_tokens.weight"].mean(axis=0)
    np.testing.assert_allclose(embedding[V:], np.tile(mean_D, (6, 1)), rtol=1e-6)
    assert ("lm_head" in new_params) != tied
    if not tied:
        kernel = np.asarray(new_params["lm_head"]["kernel"])
        np.testing.assert_array_equal(kernel[:, :V], tensors["lm_head.weight"].T)
        mean_head_D = tensors["lm_head.weight"].mean(axis=0)
        np.testing.assert_allclose(kernel[:, V:], np.tile(mean_head_D[:, None], (1, 6)), rtol=1e-6)
    np.testing.assert_array_equal(
        params["embed"]["embedding"], tensors["model.embed_tokens.weight"]
    )

    with pytest.raises(ValueError, match="cannot shrink"):
        hf.resize_embeddings(cfg, params, V - 1)
