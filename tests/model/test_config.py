"""ModelConfig: presets, validation, parameter and FLOP counts."""

import dataclasses

import jax
import pytest

from model import config, transformer


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_counts_the_initialized_tree(tie):
    cfg = config.get_preset("tiny", tie_embeddings=tie)
    shapes = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0)))
    assert cfg.num_params() == _count(shapes)


def test_llama_presets_have_the_published_sizes():
    assert config.get_preset("llama3_1b").num_params() == 1_235_814_400  # Llama-3.2-1B
    assert config.get_preset("llama3_8b").num_params() == 8_030_261_248  # Llama-3.1-8B
    assert 1_000_000 <= config.get_preset("small").num_params() <= 3_000_000


@pytest.mark.parametrize("tie", [False, True])
def test_flops_are_six_per_matmul_weight_plus_attention(tie):
    cfg = config.get_preset("base", tie_embeddings=tie)
    embedding = cfg.vocab_size * cfg.d_model
    norms = (2 * cfg.num_layers + 1) * cfg.d_model
    # Tied or not, the output projection is a matmul and the input lookup is not.
    matmul_weights = cfg.num_params() - norms - (0 if tie else embedding)
    assert cfg.flops_per_token(0) == 6 * matmul_weights
    slope = cfg.flops_per_token(1024) - cfg.flops_per_token(512)
    assert slope == 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 512


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "multiple of"),
        ({"head_dim": 7}, "even"),
        ({"dtype": "float16"}, "dtype"),
        ({"remat": "sometimes"}, "remat"),
        ({"attention": "flash"}, "attention"),
        ({"attention": "cudnn"}, "bfloat16"),
        ({"d_model": 0}, "positive int"),
        ({"rope_scaling": ("yarn", 2.0, 1.0, 4.0, 8192)}, "rope_scaling"),
        ({"rope_scaling": ("llama3", 8.0, 4.0, 1.0, 8192)}, "low_freq_factor"),
    ],
)
def test_invalid_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.get_preset("tiny", **overrides)


def test_get_preset_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown model preset"):
        config.get_preset("huge")
    with pytest.raises(ValueError, match="d_modle"):
        config.get_preset("tiny", d_modle=64)


def test_overrides_apply_and_json_lists_become_tuples():
    cfg = config.get_preset(
        "llama3_1b", rope_scaling=["llama3", 8.0, 1.0, 4.0, 8192], dtype="float32"
    )
    assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.compute_dtype == jax.numpy.float32
    hash(cfg)  # static argument to jit
    assert dataclasses.replace(cfg, d_model=64).d_model == 64
