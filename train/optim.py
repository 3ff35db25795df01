"""The optimizer: AdamW with warmup and cosine decay, global-norm clipping, frozen params."""

from __future__ import annotations

import re

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup to `opt.lr`, then cosine decay to `opt.lr * opt.end_lr_ratio`."""
    warmup = min(opt.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.lr,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=opt.lr * opt.end_lr_ratio,
    )


def param_path(path) -> str:
    """ "layers/attn/q/kernel"-style name of a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_mask(params, freeze_regex: str):
    """A pytree of bools: True where the parameter trains, False where `freeze_regex` matches."""
    if not freeze_regex:
        return jax.tree.map(lambda _: True, params)
    pattern = re.compile(freeze_regex)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: not pattern.search(param_path(path)), params
    )
    if all(jax.tree.leaves(mask)):
        raise ValueError(
            f"optimizer.freeze={freeze_regex!r} matches no parameter; paths look like "
            f"{param_path(jax.tree_util.tree_flatten_with_path(params)[0][0][0])!r}"
        )
    return mask


def lr_multipliers(params, pattern: str, mult: float):
    """A pytree of floats: `mult` where `pattern` matches the parameter's path, else 1.0."""
    if not pattern:
        return jax.tree.map(lambda _: 1.0, params)
    regex = re.compile(pattern)
    multipliers = jax.tree_util.tree_map_with_path(
        lambda path, _: mult if regex.search(param_path(path)) else 1.0, params
    )
    if all(m == 1.0 for m in jax.tree.leaves(multipliers)) and mult != 1.0:
        raise ValueError(f"optimizer.lr_mult_pattern={pattern!r} matches no parameter")
    return multipliers


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by its constant in `multipliers` (a pytree like the params)."""

    def update(updates, state, params=None):
        del params
        # Inside multi_transform, frozen leaves arrive as MaskedNode: pass them through.
        scaled = jax.tree.map(
            lambda m, u: u if isinstance(u, optax.MaskedNode) else u * m, multipliers, updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int, params):
    """Returns (optax transformation, lr schedule) for `params` (arrays or shapes)."""
    schedule = learning_rate_schedule(opt, num_steps)
    # Only matmul kernels decay; norm scales, embeddings and head biases do not (the usual
    # LLM recipe). By name, because scanned layers give a norm scale rank 2.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: param_path(path).endswith("kernel"), params
    )
    adamw = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
        scale_by_tree(lr_multipliers(params, opt.lr_mult_pattern, opt.lr_mult)),
    )
    mask = trainable_mask(params, opt.freeze)
    labels = jax.tree.map(lambda trains: "train" if trains else "frozen", mask)
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
