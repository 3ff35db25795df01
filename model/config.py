"""ModelConfig: the shape and numerics of the decoder, plus named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# How attention without a KV cache (training, scoring) is computed:
#   "einsum": grouped einsums over materialized [L, S] scores; any backend, the CPU's fastest;
#   "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, bfloat16): no [L, S] scores in memory,
#     and the blocks above the diagonal are skipped;
#   "xla": the reference behind the same jax.nn.dot_product_attention call, so CPU tests
#     check the fused path's plumbing (head grouping, packing mask) against "einsum".
# Decoding with a cache always uses "einsum": one query row per step has no scores to fuse.
ATTENTION_KERNELS = ("einsum", "cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-architecture hyperparameters; frozen and hashable so jit can take it as static."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # None, or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions).
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; logits are always returned in float32
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "einsum"  # one of ATTENTION_KERNELS
    # > 0: the reward head also reads how surprised the model's own language model is by
    # the last this-many tokens (model.transformer.RewardHead); 0: a plain linear head.
    reward_surprise_window: int = 0

    def __post_init__(self):
        # JSON round trips turn the rope_scaling tuple into a list; accept that.
        if isinstance(self.rope_scaling, list):
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        dims = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        for name in (*dims, "mlp_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dims")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; use one of {DTYPES}")
        window = self.reward_surprise_window
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(
                f"ModelConfig.reward_surprise_window must be an int >= 0, got {window!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; use one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}; use one of {ATTENTION_KERNELS}"
            )
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(
                "ModelConfig.attention='cudnn' needs dtype='bfloat16' (cuDNN's fused attention "
                "takes 16-bit inputs); use attention='einsum' for float32"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")
        _check_rope_scaling(self.rope_scaling)

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype activations are computed in."""
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        """The jnp dtype parameters are stored in."""
        return DTYPES[self.param_dtype]

    def layer_params(self) -> int:
        """Parameters in one decoder layer (two norms, attention, MLP)."""
        D, H, K, Dh, F = (
            self.d_model,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.mlp_dim,
        )
        return 2 * D + D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F

    def num_params(self) -> int:
        """Parameters of the language model (embedding, layers, final norm, untied head)."""
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else embed
        return embed + self.num_layers * self.layer_params() + self.d_model + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM formula used for MFU."""
        # Every matmul weight costs 6 FLOPs per token (2 forward, 4 backward); the embedding
        # lookup is not a matmul but the output projection is, tied or not.
        matmul_params = self.num_layers * (self.layer_params() - 2 * self.d_model)
        matmul_params += self.d_model * self.vocab_size
        # Scores and weighted values: 2 matmuls of 2*seq_len*H*Dh each, times 3 for backward;
        # like PaLM, causal masking is not subtracted.
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(6 * matmul_params + attention)


def _check_rope_scaling(scaling: tuple | None) -> None:
    """Raises a clear error unless `scaling` is None or a valid Llama 3.1 tuple."""
    if scaling is None:
        return
    if len(scaling) != 5 or scaling[0] != "llama3":
        raise ValueError(
            "rope_scaling must be None or ('llama3', factor, low_freq_factor, high_freq_factor, "
            f"original_max_position_embeddings), got {scaling!r}"
        )
    _, factor, low, high, original = scaling
    if factor <= 0 or low <= 0 or high <= low or original <= 0:
        raise ValueError(
            f"rope_scaling {scaling!r} needs factor > 0, 0 < low_freq_factor < high_freq_factor "
            "and original_max_position_embeddings > 0"
        )


PRESETS: dict[str, ModelConfig] = {
    # For tests: a few thousand parameters, compiles in a second.
    "tiny": ModelConfig(
        vocab_size=128,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        max_seq_len=128,
    ),
    # About 2M parameters at a 2k vocabulary: trains on a 2-core CPU in minutes.
    "small": ModelConfig(
        vocab_size=2048,
        d_model=192,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=512,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # The benchmark size: 34M parameters at an 8k vocabulary.
    "base": ModelConfig(
        vocab_size=8192,
        d_model=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=1408,
        max_seq_len=2048,
    ),
    # Llama-3.2-1B.
    "llama3_1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=("llama3", 32.0, 1.0, 4.0, 8192),
        tie_embeddings=True,
        dtype="bfloat16",
    ),
    # Llama-3.1-8B.
    "llama3_8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192),
        dtype="bfloat16",
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` replacing fields (validated like any ModelConfig)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)
