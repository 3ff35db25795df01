"""The Llama decoder in Flax Linen: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Pure functions of (params, inputs). Packed rows carry `segment_ids_BxL` (0 = padding) and
per-segment positions; decoding passes an explicit `KVCache` in and gets the updated one back.
Scalar heads (value, reward) are separate parameter subtrees read off the final hidden state.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.sharding import unbox, with_logical_constraint

Array = jax.Array
Params = dict[str, Any]

# Finite, so a fully masked row gives a uniform softmax rather than NaN.
_MASKED = -1e30
_ACTIVATION = ("batch", "length", "embed")
_KV = ("batch", "length", "heads", "kv")
# Queries are constrained grouped by kv head so q and k always split alike: splitting q by head
# and k by head dim (when K does not divide the tensor axis) gave XLA wrong gradients.
_GROUPED_Q = ("batch", "length", "heads", None, "kv")
# Heads before slots: a decode step's score and value dots then read each (row, kv head)'s
# keys and values as one contiguous matrix, which halved their time on CPU against [S, K, Dh].
# Values are stored transposed, [Dh, S]. XLA:CPU puts the cache operand first in both dots,
# and only then are both plain [M, K] x [K, N] matmuls: keys [S, Dh] x q [Dh, G] and values
# [Dh, S] x probs [S, G]. In that form the fast matmul library (YNNPACK) takes them; with
# [S, Dh] values the value dot fell back to a slower loop, and with [Dh, S] keys the score
# dot did. Batch 64, 288 slots, 2-core CPU: 4.7k -> 6.9k tokens/s with 2 kv heads (G = 3),
# 3.7k -> 4.4k with 6 (G = 1, a matrix-vector product, which stays off YNNPACK).
KEY_CACHE_AXES = ("batch", "heads", "length", "kv")
VALUE_CACHE_AXES = ("batch", "heads", "kv", "length")
_HEAD_NAME = re.compile(r"[a-z][a-z0-9_]*")


# ----------------------------------------------------------------------------- cache, output


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer; slot s of row b holds the token at position s.

    One array per layer rather than one [Y, ...] stack: a layer's attention then reads its
    own buffer. Taking a layer out of a stack inside the decode loop copied it (XLA:CPU
    materializes the dynamic slice for the dot): 41% of a decode step at batch 64 with 6 kv
    heads and 288 slots on a 2-core CPU.
    """

    k: tuple[Array, ...]  # Y x [B, K, S, Dh] in the compute dtype
    v: tuple[Array, ...]  # Y x [B, K, Dh, S] (values transposed)
    end_index: Array  # [B] int32: slots written so far, i.e. the next token's position

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.k[0].shape[2]

    def with_slots(self, num_slots: int) -> KVCache:
        """The first `num_slots` slots of every row, or all of them padded with empty slots.

        Slots past a row's end_index are never read, so cutting them or adding zeros there
        changes nothing a forward sees (while every row's end_index stays <= num_slots).
        """
        S = self.max_len
        if num_slots == S:
            return self

        def resize(x: Array, slot_axis: int) -> Array:
            if num_slots < S:
                return jax.lax.slice_in_dim(x, 0, num_slots, axis=slot_axis)
            widths = [(0, 0)] * x.ndim
            widths[slot_axis] = (0, num_slots - S)
            return jnp.pad(x, widths)

        return self.replace(
            k=tuple(resize(k, 2) for k in self.k), v=tuple(resize(v, 3) for v in self.v)
        )

    def map_rows(self, fn) -> KVCache:
        """The cache with `fn` applied to every array's batch axis (axis 0), e.g. a gather."""
        return KVCache(
            k=tuple(fn(k) for k in self.k),
            v=tuple(fn(v) for v in self.v),
            end_index=fn(self.end_index),
        )


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots for `batch` rows."""
    B, K, S, Dh = batch, cfg.num_kv_heads, max_len, cfg.head_dim

    def zeros(shape, axes):
        return with_logical_constraint(jnp.zeros(shape, cfg.compute_dtype), axes)

    layers = range(cfg.num_layers)
    return KVCache(
        k=tuple(zeros((B, K, S, Dh), KEY_CACHE_AXES) for _ in layers),
        v=tuple(zeros((B, K, Dh, S), VALUE_CACHE_AXES) for _ in layers),
        end_index=jnp.zeros((batch,), jnp.int32),
    )


@flax.struct.dataclass
class ModelOutput:
    """What `Transformer.forward` returns."""

    logits: Array | None  # [B, L, V] float32, None when compute_logits=False
    hidden_BxLxD: Array  # after the final norm, in the compute dtype
    scores: dict[str, Array]  # one float32 [B, L] per scalar head
    cache: KVCache | None  # the updated cache when one was passed in


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32, with Llama 3.1 long-context scaling if set."""
    # float32 like Hugging Face, so long positions round the same way.
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_scaling is None:
        return inv_freq
    _, factor, low_factor, high_factor, original = cfg.rope_scaling
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (original / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > original / low_factor, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= original / high_factor) & (wavelen <= original / low_factor)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxLxHxDh: Array, positions_BxL: Array, inv_freq: np.ndarray) -> Array:
    """Rotates pairs (i, i + Dh/2) by position * inv_freq[i]."""
    # This is Hugging Face's `rotate_half` pairing (not interleaved pairs), so HF q/k weights
    # load with no permutation.
    angles_BxLx1xR = positions_BxL[:, :, None, None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles_BxLx1xR), jnp.sin(angles_BxLx1xR)
    x1, x2 = jnp.split(x_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxDh.dtype)


def segment_positions(segment_ids_BxL: Array) -> Array:
    """Positions restarting at 0 wherever the segment id changes."""
    B, L = segment_ids_BxL.shape
    index_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    changed_BxL = segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
    starts_BxL = jnp.concatenate([jnp.ones((B, 1), bool), changed_BxL], axis=1)
    start_index_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_BxL, 0), axis=1)
    return index_BxL - start_index_BxL


# ----------------------------------------------------------------------------- layers


class Linear(nn.Module):
    """A bias-free map contracting x's last `num_in` dims with the kernel's first `num_in`."""

    cfg: ModelConfig
    shape: tuple[int, ...]  # the kernel's shape
    axes: tuple[str, ...]  # its logical axes
    num_in: int = 1
    float32_out: bool = False  # accumulate and return float32 (logits)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x contracted with the kernel, in the compute dtype (float32 if float32_out)."""
        dims = range(len(self.shape))
        # LeCun normal with fan-in over every contracted dim (D for q, H * Dh for o).
        init = nn.initializers.variance_scaling(
            1.0,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(dims[: self.num_in]),
            out_axis=tuple(dims[self.num_in :]),
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes),
            self.shape,
            self.cfg.weight_dtype,
        )
        dtype = self.cfg.compute_dtype
        contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
        return jax.lax.dot_general(
            x.astype(dtype),
            kernel.astype(dtype),
            (contract, ((), ())),
            preferred_element_type=jnp.float32 if self.float32_out else None,
        )


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        """x / rms(x) * scale, cast to the compute dtype."""
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x_BxLxD.shape[-1],),
            self.cfg.weight_dtype,
        )
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def attend(q_BxLxKxGxDh: Array, k_BxKxSxDh: Array, v_BxKxDhxS: Array, mask_BxLxS: Array) -> Array:
    """Grouped-query softmax attention: the G query heads of group k read kv head k.

    Values come transposed, as the cache holds them (see VALUE_CACHE_AXES).
    """
    q_BxLxKxGxDh = q_BxLxKxGxDh * q_BxLxKxGxDh.shape[-1] ** -0.5
    scores_BxKxGxLxS = jnp.einsum(
        "blkgd,bksd->bkgls", q_BxLxKxGxDh, k_BxKxSxDh, preferred_element_type=jnp.float32
    )
    scores_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxKxGxLxS, _MASKED)
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxKxDhxS.dtype)
    return jnp.einsum("bkgls,bkds->blkgd", probs_BxKxGxLxS, v_BxKxDhxS)


# Causal attention without a cache splits the queries into up to this many row blocks, and
# block i reads only the keys up to its own last position: the blocks above the diagonal are
# all masked, so 4 blocks compute 10/16 of the [L, L] scores. With XLA's einsum the scores
# are materialized in float32, and on a CPU writing and re-reading them is what attention
# costs: at 16 x 384 tokens, 6 heads, fwd+bwd per layer went from 271 to 128 ms (2-core CPU).
CAUSAL_BLOCKS = 4
MIN_CAUSAL_BLOCK = 32  # shorter rows are not split: a block's einsums cost more than it saves


def attend_causal(
    q_BxLxKxGxDh: Array, k_BxKxLxDh: Array, v_BxKxDhxL: Array, mask_BxLxL: Array
) -> Array:
    """`attend` for queries and keys at the same L positions, under a mask that is causal.

    The same values as `attend` up to float rounding (each softmax sums only keys it may read).
    """
    L = q_BxLxKxGxDh.shape[1]
    num_blocks = max(1, min(CAUSAL_BLOCKS, L // MIN_CAUSAL_BLOCK))
    ends = [round(L * (i + 1) / num_blocks) for i in range(num_blocks)]
    outs, start = [], 0
    for end in ends:
        outs.append(
            attend(
                q_BxLxKxGxDh[:, start:end],
                k_BxKxLxDh[:, :, :end],
                v_BxKxDhxL[..., :end],
                mask_BxLxL[:, start:end, :end],
            )
        )
        start = end
    return jnp.concatenate(outs, axis=1)


def attend_fused(
    q_BxLxHxDh: Array,
    k_BxSxKxDh: Array,
    v_BxSxKxDh: Array,
    same_segment_BxLxS: Array | None,
    implementation: str,
) -> Array:
    """Causal grouped-query attention through `jax.nn.dot_product_attention`.

    The kernel applies causality itself (cuDNN skips the blocks above the diagonal), so the
    mask carries only packing: which keys share the query's segment, or None when every row
    holds one sequence. Query head h reads kv head h // G, as in `attend`.
    """
    mask_Bx1xLxS = None if same_segment_BxLxS is None else same_segment_BxLxS[:, None]
    return jax.nn.dot_product_attention(
        q_BxLxHxDh,
        k_BxSxKxDh,
        v_BxSxKxDh,
        mask=mask_Bx1xLxS,
        is_causal=True,
        implementation=implementation,
    )


def _write_cache(cache: Array, new_BxLxKxDh: Array, start_B: Array, slot_axis: int) -> Array:
    """Writes each row's L new entries at the row's own slot offset, in place.

    `cache` is [B, K, S, Dh] (slot_axis 2, keys) or [B, K, Dh, S] (slot_axis 3, values).
    """
    B, L = new_BxLxKxDh.shape[:2]
    rows_BxL = jnp.broadcast_to(jnp.arange(B)[:, None], (B, L))
    slots_BxL = start_B[:, None] + jnp.arange(L)[None, :]
    # One scatter: (row, slot) pairs index axis 0 and the slot axis, which are not adjacent,
    # and NumPy indexing then puts those index dims first, so the update is laid out
    # [B, L, K, Dh] as given, whichever of the last two axes holds the slots.
    index = [rows_BxL, slice(None), slice(None), slice(None)]
    index[slot_axis] = slots_BxL
    return cache.at[tuple(index)].set(new_BxLxKxDh.astype(cache.dtype), mode="promise_in_bounds")


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optionally through a KV cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: Array,
        positions_BxL: Array,
        mask_BxLxS: Array | None,
        kv: tuple[Array, Array] | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """(output [B, L, D], this layer's cache (k [B, K, S, Dh], v [B, K, Dh, S]) with the L
        new entries written, or None without a cache).

        `mask_BxLxS` says which keys each query may read. Without a cache and with a fused
        kernel (`cfg.attention` other than "einsum"), the kernel applies causality and the
        mask holds only packing (same segment), or is None for one sequence per row.
        """
        cfg = self.cfg
        D, H, K, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        in_axes = ("embed", "heads", "kv")
        q_BxLxHxDh = Linear(cfg, (D, H, Dh), in_axes, name="q")(x_BxLxD)
        k_BxLxKxDh = Linear(cfg, (D, K, Dh), in_axes, name="k")(x_BxLxD)
        v_BxLxKxDh = Linear(cfg, (D, K, Dh), in_axes, name="v")(x_BxLxD)
        inv_freq = rope_frequencies(cfg)
        B, L = positions_BxL.shape
        # Hugging Face's repeat_kv order: query head h belongs to kv head h // G.
        q_BxLxKxGxDh = apply_rope(q_BxLxHxDh, positions_BxL, inv_freq).reshape(B, L, K, H // K, Dh)
        q_BxLxKxGxDh = with_logical_constraint(q_BxLxKxGxDh, _GROUPED_Q)
        k_BxLxKxDh = with_logical_constraint(apply_rope(k_BxLxKxDh, positions_BxL, inv_freq), _KV)
        v_BxLxKxDh = with_logical_constraint(v_BxLxKxDh, _KV)
        o = Linear(cfg, (H, Dh, D), ("heads", "kv", "embed"), num_in=2, name="o")
        if kv is None and cfg.attention != "einsum":
            out_BxLxHxDh = attend_fused(
                q_BxLxKxGxDh.reshape(B, L, H, Dh),
                k_BxLxKxDh,
                v_BxLxKxDh,
                mask_BxLxS,
                cfg.attention,
            )
            return o(out_BxLxHxDh), None
        if kv is None:
            k_BxKxLxDh = jnp.swapaxes(k_BxLxKxDh, 1, 2)
            v_BxKxDhxL = jnp.transpose(v_BxLxKxDh, (0, 2, 3, 1))
            out_BxLxKxGxDh = attend_causal(q_BxLxKxGxDh, k_BxKxLxDh, v_BxKxDhxL, mask_BxLxS)
        else:
            # With a cache, a row's first position is its write slot; the layer's buffers are
            # updated in place and attended to where they lie.
            start_B = positions_BxL[:, 0]
            k_BxKxSxDh = _write_cache(kv[0], k_BxLxKxDh, start_B, slot_axis=2)
            v_BxKxDhxS = _write_cache(kv[1], v_BxLxKxDh, start_B, slot_axis=3)
            kv = (k_BxKxSxDh, v_BxKxDhxS)
            out_BxLxKxGxDh = attend(q_BxLxKxGxDh, k_BxKxSxDh, v_BxKxDhxS, mask_BxLxS)
        out_BxLxKxGxDh = with_logical_constraint(out_BxLxKxGxDh, _GROUPED_Q)
        return o(out_BxLxKxGxDh.reshape(B, L, H, Dh)), kv


class Mlp(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        """The SwiGLU output [B, L, D]."""
        cfg = self.cfg
        D, F = cfg.d_model, cfg.mlp_dim
        gate_BxLxF = Linear(cfg, (D, F), ("embed", "mlp"), name="gate")(x_BxLxD)
        up_BxLxF = Linear(cfg, (D, F), ("embed", "mlp"), name="up")(x_BxLxD)
        h_BxLxF = with_logical_constraint(
            nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp")
        )
        return Linear(cfg, (F, D), ("mlp", "embed"), name="down")(h_BxLxF)


class Block(nn.Module):
    """One pre-norm decoder layer; carries (x, its kv cache or None) so nn.scan can scan it."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        carry: tuple[Array, tuple[Array, Array] | None],
        positions_BxL: Array,
        mask_BxLxS: Array | None,
    ) -> tuple[tuple[Array, tuple[Array, Array] | None], None]:
        """((x after the attention and MLP residuals, the layer's updated kv or None), None)."""
        x_BxLxD, kv = carry
        h_BxLxD, kv = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_BxLxD), positions_BxL, mask_BxLxS, kv
        )
        x_BxLxD = x_BxLxD + h_BxLxD
        x_BxLxD = x_BxLxD + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxLxD))
        return (with_logical_constraint(x_BxLxD, _ACTIVATION), kv), None


class Embedder(nn.Module):
    """Token embedding; `decode` is the tied output projection."""

    cfg: ModelConfig

    def setup(self):
        # fan-in over D gives unit-scale logits when the table doubles as the output layer.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model),
            self.cfg.weight_dtype,
        )

    def encode(self, tokens_BxL: Array) -> Array:
        """Embeddings [B, L, D] in the compute dtype."""
        return jnp.take(self.embedding, tokens_BxL, axis=0).astype(self.cfg.compute_dtype)

    def decode(self, x_BxLxD: Array) -> Array:
        """float32 logits against the embedding table."""
        table_VxD = self.embedding.astype(x_BxLxD.dtype)
        return jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD, preferred_element_type=jnp.float32)


# Heads whose kernel starts at zero. A random value head outputs O(1) noise on every token, and
# PPO's first advantages (returns - values) would be that noise; at zero they are the returns.
_ZERO_INIT_HEADS = ("value",)


def _scalar_head(cfg: ModelConfig, zero_init: bool, **kwargs: Any) -> nn.Dense:
    """A [D] -> 1 linear head in float32 (value, reward); `zero_init`: it starts at 0."""
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
        1,
        dtype=jnp.float32,
        param_dtype=cfg.weight_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        **kwargs,
    )


# A surprise scale s = softplus(raw) starts at 1: the logit drops by the surprise in nats.
_RAW_SCALE_AT_ONE = float(np.log(np.expm1(1.0)))


def token_surprise(logits_BxLxV: Array, tokens_BxL: Array, segment_ids_BxL: Array) -> Array:
    """-log p(token t | the tokens before it) [B, L], from the logits at t - 1; 0 where t
    opens a segment (nothing predicted it) or is padding (segment 0)."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
    next_logp_BxL = jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
    segment_BxL = segment_ids_BxL[:, 1:]
    continues_BxL = (segment_BxL == segment_ids_BxL[:, :-1]) & (segment_BxL != 0)
    surprise_BxL = jnp.where(continues_BxL, -next_logp_BxL, 0.0)
    return jnp.pad(surprise_BxL, ((0, 0), (1, 0)))


def window_max(x_BxL: Array, segment_ids_BxL: Array, window: int) -> Array:
    """max of a non-negative x over positions t - window + 1 .. t of t's own segment [B, L].

    By doubling, in O(log window) passes: once `out` holds the max over the last `span`
    tokens, out at t - k (k <= span) extends it to span + k tokens. A value from t - k counts
    only if t - k is in t's segment, and since segments are contiguous, so is every token
    between; otherwise `out` at t already reaches back to the segment's start.
    """
    window = min(window, x_BxL.shape[1])

    def from_back(y_BxL: Array, shift: int) -> Array:  # y at t - shift, 0 outside t's segment
        pad = ((0, 0), (shift, 0))
        earlier_BxL = jnp.pad(y_BxL[:, :-shift], pad)
        same_BxL = jnp.pad(segment_ids_BxL[:, :-shift], pad, constant_values=-1) == segment_ids_BxL
        return jnp.where(same_BxL, earlier_BxL, 0.0)

    out_BxL, span = x_BxL, 1
    while 2 * span <= window:
        out_BxL, span = jnp.maximum(out_BxL, from_back(out_BxL, span)), 2 * span
    if span < window:
        out_BxL = jnp.maximum(out_BxL, from_back(out_BxL, window - span))
    return out_BxL


class RewardHead(nn.Module):
    """A linear reward logit minus the model's recent surprise, scaled by a learned s > 0:

        logit_t = w . h_t + b - s * max(-log p(token j)  for j in t - window + 1 .. t)

    A reward model starts from an SFT policy, whose language model already predicts each
    digit of a step; a written digit it did not expect is the tell of a wrong step. A linear
    head on h_t cannot read that: the prediction of token j is formed in the last layer at
    j - 1, which no attention reads, and a 3-layer trunk does not redo the arithmetic at
    the step's end (the session-16 PRM with a linear head: best-of-64 fell to 11%, README).
    The window should cover a step, so the logit at a step's end sees all of it (a PRM), or
    the whole response, so its last token does (an ORM). Only the response's tokens count
    when the caller passes `response_mask_BxL` to `Transformer.forward`: the prompt is given,
    not written, and a problem's random digits surprise any model.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden_BxLxD: Array, surprise_BxL: Array, segment_ids_BxL: Array):
        # Zero at first: the head starts as the surprise alone, which already ranks steps
        # (README), and a random linear term only adds noise the training must remove.
        linear_BxL = _scalar_head(self.cfg, True, name="linear")(hidden_BxLxD)[..., 0]
        raw_scale = self.param(
            "surprise_scale",
            nn.with_logical_partitioning(nn.initializers.constant(_RAW_SCALE_AT_ONE), (None,)),
            (1,),
            self.cfg.weight_dtype,
        )
        recent_BxL = window_max(surprise_BxL, segment_ids_BxL, self.cfg.reward_surprise_window)
        return linear_BxL - jax.nn.softplus(raw_scale.astype(jnp.float32)) * recent_BxL


def reads_surprise(cfg: ModelConfig, head: str) -> bool:
    """Whether scalar head `head` is a RewardHead that reads the model's surprise."""
    return head == "reward" and cfg.reward_surprise_window > 0


def _check_heads(heads: tuple[str, ...]) -> None:
    """Raises unless `heads` are distinct lowercase names other than "lm"."""
    for name in heads:
        if not isinstance(name, str) or not _HEAD_NAME.fullmatch(name) or name == "lm":
            raise ValueError(
                f"scalar head name {name!r} must match [a-z][a-z0-9_]* and not be 'lm'"
            )
    if len(set(heads)) != len(heads):
        raise ValueError(f"scalar heads {heads} repeat a name")


# ----------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    """Decoder-only Llama; `heads` names scalar heads, each stored as params["<name>_head"]."""

    cfg: ModelConfig
    heads: tuple[str, ...] = ()

    def setup(self):
        cfg = self.cfg
        _check_heads(tuple(self.heads))
        self.embed = Embedder(cfg)
        block = Block
        if cfg.remat != "none":
            policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
            # Under scan, XLA cannot CSE across iterations, so the CSE guard only costs speed.
            block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            # A list assigned in setup names its items layers_0, layers_1, ...
            self.layers = [block(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(
                cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), float32_out=True
            )
        for name in self.heads:
            if reads_surprise(cfg, name):
                setattr(self, f"{name}_head", RewardHead(cfg))
            else:
                setattr(self, f"{name}_head", _scalar_head(cfg, name in _ZERO_INIT_HEADS))

    def __call__(
        self,
        tokens_BxL: Array,
        positions_BxL: Array | None = None,
        segment_ids_BxL: Array | None = None,
    ) -> Array:
        """float32 logits [B, L, V] of int32 tokens [B, L]."""
        return self.forward(tokens_BxL, positions_BxL, segment_ids_BxL).logits

    def unembed(self, hidden_BxLxD: Array) -> Array:
        """float32 logits [B, L, V] from final-normed hidden states."""
        if self.cfg.tie_embeddings:
            logits_BxLxV = self.embed.decode(hidden_BxLxD)
        else:
            logits_BxLxV = self.lm_head(hidden_BxLxD)
        return with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))

    def forward(
        self,
        tokens_BxL: Array,
        positions_BxL: Array | None = None,
        segment_ids_BxL: Array | None = None,
        cache: KVCache | None = None,
        compute_logits: bool = True,
        response_mask_BxL: Array | None = None,
    ) -> ModelOutput:
        """Logits, final hidden states, scalar-head scores and the updated cache.

        Without a cache, `segment_ids_BxL` (0 = padding) confines attention to each packed
        segment and, when `positions_BxL` is None, positions restart at every segment.
        With a cache, row b's tokens go to slots and positions `cache.end_index[b]` onwards;
        `segment_ids_BxL` then only marks right padding, which is not counted as written.
        `response_mask_BxL` (nonzero on response tokens) limits the surprise a RewardHead
        reads to the response; None counts every token.
        """
        B, L = tokens_BxL.shape
        packed = segment_ids_BxL is not None
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((B, L), jnp.int32)
        if cache is None:
            if positions_BxL is None:
                positions_BxL = segment_positions(segment_ids_BxL)
            same_segment_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
            if self.cfg.attention != "einsum":
                # Fused kernels apply causality themselves; only packing needs a mask.
                mask_BxLxS = same_segment_BxLxL if packed else None
            else:
                causal_LxL = jnp.tril(jnp.ones((L, L), bool))
                mask_BxLxS = causal_LxL[None] & same_segment_BxLxL
        else:
            if positions_BxL is not None:
                raise ValueError("with a cache, positions come from cache.end_index; pass None")
            positions_BxL = cache.end_index[:, None] + jnp.arange(L, dtype=jnp.int32)
            # Slot s holds position s, so causality and unwritten slots are one comparison.
            slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
            mask_BxLxS = slots_S[None, None, :] <= positions_BxL[:, :, None]

        x_BxLxD = with_logical_constraint(self.embed.encode(tokens_BxL), _ACTIVATION)
        new_cache = None
        if cache is not None:
            x_BxLxD, k, v = self._cached_layers(x_BxLxD, positions_BxL, mask_BxLxS, cache)
            written_B = jnp.sum(segment_ids_BxL != 0, axis=1, dtype=jnp.int32)
            new_cache = KVCache(k=k, v=v, end_index=cache.end_index + written_B)
        elif self.cfg.scan_layers:
            (x_BxLxD, _), _ = self.layers((x_BxLxD, None), positions_BxL, mask_BxLxS)
        else:
            for layer in self.layers:
                (x_BxLxD, _), _ = layer((x_BxLxD, None), positions_BxL, mask_BxLxS)
        hidden_BxLxD = self.final_norm(x_BxLxD)

        surprise = any(reads_surprise(self.cfg, name) for name in self.heads)
        if surprise and cache is not None:
            raise ValueError(
                "a reward head with reward_surprise_window > 0 reads the logits before each "
                "token, which a cached call lacks; score whole sequences without a cache"
            )
        logits_BxLxV = self.unembed(hidden_BxLxD) if compute_logits or surprise else None
        scores = {}
        for name in self.heads:
            head = getattr(self, f"{name}_head")
            if reads_surprise(self.cfg, name):
                surprise_BxL = token_surprise(logits_BxLxV, tokens_BxL, segment_ids_BxL)
                if response_mask_BxL is not None:
                    surprise_BxL = jnp.where(response_mask_BxL != 0, surprise_BxL, 0.0)
                scores[name] = head(hidden_BxLxD.astype(jnp.float32), surprise_BxL, segment_ids_BxL)
            else:
                scores[name] = head(hidden_BxLxD.astype(jnp.float32))[..., 0]
        return ModelOutput(
            logits=logits_BxLxV if compute_logits else None,
            hidden_BxLxD=hidden_BxLxD,
            scores=scores,
            cache=new_cache,
        )

    def _cached_layers(
        self, x_BxLxD: Array, positions_BxL: Array, mask_BxLxS: Array, cache: KVCache
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """(x after every layer, each layer's updated k and v): the layers one after another.

        Unrolled even when the parameters are stacked for nn.scan, since a scan would carry
        the layers' caches as one stack and copy its layer out of it (see KVCache). Slicing
        a layer's weights out of the stack is cheaper (no cache), and `sampler.decode`
        unstacks them once before its loop.
        """
        unstacked = None
        if self.cfg.scan_layers:
            unstacked = unstack_layers({"layers": unbox(self.variables["params"]["layers"])})
        k, v = [], []
        for i in range(self.cfg.num_layers):
            kv = (cache.k[i], cache.v[i])
            if unstacked is not None:
                # A module built with parent=None is a plain function of its params.
                (x_BxLxD, kv), _ = Block(self.cfg, parent=None).apply(
                    {"params": unstacked[f"layers_{i}"]}, (x_BxLxD, kv), positions_BxL, mask_BxLxS
                )
            else:
                (x_BxLxD, kv), _ = self.layers[i]((x_BxLxD, kv), positions_BxL, mask_BxLxS)
            k.append(kv[0])
            v.append(kv[1])
        return x_BxLxD, tuple(k), tuple(v)


# ----------------------------------------------------------------------------- param trees


def init_variables(cfg: ModelConfig, rng: Array, heads: tuple[str, ...] = ()) -> Params:
    """Boxed (nn.Partitioned) parameters; the init_fn for sharding.init_sharded."""
    tokens_1x1 = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg, tuple(heads)).init(rng, tokens_1x1)["params"]


@functools.partial(jax.jit, static_argnames=("cfg", "heads"))
def init_params(cfg: ModelConfig, rng: Array, heads: tuple[str, ...] = ()) -> Params:
    """Plain (unboxed) parameters on the default device; use sharding.init_sharded at scale."""
    return unbox(init_variables(cfg, rng, heads))


def head_key(name: str) -> str:
    """The params key of scalar head `name`."""
    return f"{name}_head"


def add_heads(params: Params, cfg: ModelConfig, heads: tuple[str, ...], rng: Array) -> Params:
    """A copy of `params` with freshly initialized scalar heads added."""
    _check_heads(tuple(heads))
    present = [name for name in heads if head_key(name) in params]
    if present:
        raise ValueError(f"params already have scalar heads {present}")
    hidden_1x1xD = jnp.zeros((1, 1, cfg.d_model), jnp.float32)
    new = dict(params)
    for name, key in zip(heads, jax.random.split(rng, len(heads)), strict=True):
        if reads_surprise(cfg, name):
            ones_1x1 = jnp.ones((1, 1), jnp.int32)
            head = RewardHead(cfg).init(key, hidden_1x1xD, ones_1x1.astype(jnp.float32), ones_1x1)
        else:
            head = _scalar_head(cfg, name in _ZERO_INIT_HEADS).init(key, hidden_1x1xD)
        new[head_key(name)] = unbox(head["params"])
    return new


def drop_heads(params: Params, heads: tuple[str, ...] | None = None) -> Params:
    """A copy of `params` without the named scalar heads (all of them when None)."""
    if heads is None:
        return {k: v for k, v in params.items() if not (k.endswith("_head") and k != "lm_head")}
    keys = {head_key(name) for name in heads}
    return {k: v for k, v in params.items() if k not in keys}


def unstack_layers(params: Params) -> Params:
    """Scanned params ("layers" with a leading layer axis) -> "layers_0", "layers_1", ..."""
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    new = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        new[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return new


def stack_layers(params: Params) -> Params:
    """ "layers_0", "layers_1", ... -> scanned params ("layers" with a leading layer axis)."""
    names = sorted((k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k[7:]))
    if not names:
        raise ValueError("params have no layers_<i> subtrees to stack")
    new = {k: v for k, v in params.items() if k not in names}
    new["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
    return new
