"""Supervised fine-tuning: next-token cross-entropy on assistant tokens.

The loss is a weighted mean over target tokens. Each token of an assistant turn belongs to
one part of the thinking format (headline, thoughts, summary, answer; see
data.format.encode_dialogue), and `config.loss.<part>` weights it. Tokens in none of the
parts (markers, template tokens inside the assistant turn) keep weight 1 through
`loss_mask`. A z-loss on log Z keeps the softmax normaliser near 0, which stabilises
long runs in low precision (PaLM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from train.objectives import register

PARTS = ("headline", "thoughts", "summary", "answer")


def token_weights(batch, loss_config) -> jax.Array:
    """Per-target weights [B, L]: loss_mask, re-weighted on each masked part."""
    weights_BxL = batch["loss_mask"].astype(jnp.float32)
    for part in PARTS:
        part_mask_BxL = batch[f"{part}_mask"].astype(jnp.float32)
        weights_BxL = weights_BxL + (loss_config[part] - 1.0) * part_mask_BxL
    return weights_BxL


def cross_entropy(logits_BxLxV, targets_BxL):
    """Per-token cross-entropy and log-normaliser, both [B, L], in float32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL, log_z_BxL


def masked_mean(x_BxL, mask_BxL):
    """Mean of x over the mask; 0 where the mask is empty."""
    return jnp.sum(x_BxL * mask_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)


@register("sft")
def make_sft_loss(config: ml_collections.ConfigDict, model):
    """Builds the SFT loss for `model` (a model.transformer.Transformer)."""
    loss_config = config.loss

    def loss_fn(params, batch, rng):
        del rng  # deterministic: no dropout in the decoder
        logits_BxLxV = model.apply(
            # No segment_ids: one sequence per row (bench.train_step --segments_per_row=0).
            {"params": params},
            batch["inputs"],
            batch["positions"],
            batch.get("segment_ids"),
        )
        ce_BxL, log_z_BxL = cross_entropy(logits_BxLxV, batch["targets"])
        weights_BxL = token_weights(batch, loss_config)
        ce = jnp.sum(ce_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)
        z_loss = masked_mean(jnp.square(log_z_BxL), batch["loss_mask"])
        loss = ce + loss_config.z_loss * z_loss

        correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]).astype(jnp.float32)
        metrics = {
            "ce": ce,
            "z_loss": z_loss,
            "token_accuracy": masked_mean(correct_BxL, batch["loss_mask"]),
            "target_tokens": jnp.sum(batch["loss_mask"]),
        }
        for part in PARTS:
            metrics[f"ce_{part}"] = masked_mean(ce_BxL, batch[f"{part}_mask"])
        return loss, metrics

    return loss_fn
