"""Tokens/s and MFU of the real jitted SFT train step, by model size and variant.

    python -m bench.train_step --out=bench/results/train_step.json
    python -m bench.train_step --quick --out=/tmp/train_step.json

The step is built as train/loop.py builds it: `train.step.train_step` with the `sft`
objective's loss, `train.optim.make_optimizer` and a sharded `train.state`, jitted with the
state donated. Batches are synthetic packed rows (4 examples per row, every target trained),
which cost exactly what real batches of the same shape cost. Per size it times three passes:

  forward           the SFT loss (no gradient)      model FLOPs: flops_per_token / 3
  forward+backward  its gradient (no optimizer)     model FLOPs: flops_per_token
  train step        gradient + AdamW update         model FLOPs: flops_per_token

MFU = tokens/s x model FLOPs per token / the matmul peak of the row's compute dtype.
Variant rows rerun the train step at one size with one change each; "vs default" is their
step tokens/s over that size's default row. Everything is compiled first, then timed
round-robin (one call of each pass and of each peak's jnp.dot per round), so load that
drifts during the run hits every row alike and the ratios between rows hold up.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import common
from data.format import TARGET_MASKS
from model import sharding as sharding_lib
from model.config import ModelConfig, get_preset
from model.transformer import Transformer
from train.batches import to_global
from train.configs import sft
from train.objectives import get_objective
from train.optim import make_optimizer
from train.state import init_state, param_shardings, state_shardings
from train.step import train_step

FLAGS = flags.FLAGS

# Each variant overrides ModelConfig fields of the preset (scanned layers, no remat, the
# preset's compute dtype, einsum attention); "vs default" divides by the preset's own row.
VARIANTS: dict[str, dict[str, Any]] = {
    "no_scan": {"scan_layers": False},
    "remat_full": {"remat": "full"},
    "remat_dots": {"remat": "dots_saveable"},
    "bf16": {"dtype": "bfloat16"},
    # cuDNN's fused attention (NVIDIA GPUs only): no materialized [L, S] scores.
    "cudnn": {"attention": "cudnn", "dtype": "bfloat16"},
}
PASSES = ("forward", "forward_backward", "train_step")
# Model FLOPs per token of each pass, as a fraction of ModelConfig.flops_per_token.
PASS_FLOPS = {"forward": 1 / 3, "forward_backward": 1.0, "train_step": 1.0}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure."""

    sizes: tuple[str, ...]
    batch_sizes: dict[str, int]
    seq_len: int
    variants: tuple[str, ...]
    variant_size: str
    segments_per_row: int
    warmup: int
    repeats: int
    peak_n: int


def settings_from_flags() -> Settings:
    """The flags' settings, or the tiny ones under --quick."""
    if FLAGS.quick:
        # One variant only: every compile costs seconds on a loaded CPU.
        return Settings(("tiny",), {"tiny": 8}, 64, ("no_scan",), "tiny", 4, 1, 2, 256)
    batch_sizes = {}
    for item in FLAGS.batch_sizes:
        name, _, value = item.partition(":")
        if not value.isdigit() or int(value) < 1:
            raise app.UsageError(f"--batch_sizes items look like base:8, got {item!r}")
        batch_sizes[name] = int(value)
    missing = sorted({*FLAGS.sizes, FLAGS.variant_size} - set(batch_sizes))
    if missing:
        raise app.UsageError(f"--batch_sizes has no batch for {missing}; add e.g. {missing[0]}:8")
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"unknown --variants {unknown}; choose from {sorted(VARIANTS)}")
    return Settings(
        tuple(FLAGS.sizes),
        batch_sizes,
        FLAGS.seq_len,
        tuple(FLAGS.variants),
        FLAGS.variant_size,
        FLAGS.segments_per_row,
        FLAGS.warmup,
        FLAGS.repeats,
        FLAGS.peak_n,
    )


# ----------------------------------------------------------------------------- building


def synthetic_batch(
    batch_size: int, seq_len: int, vocab_size: int, segments_per_row: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """A packed SFT batch of random tokens with the pipeline's keys; every target is trained.

    segments_per_row=0 gives unpacked rows: one sequence each and no `segment_ids`, the case
    where fused attention kernels need no mask at all.
    """
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    segment_len = -(-seq_len // max(segments_per_row, 1))
    index_L = np.arange(seq_len, dtype=np.int32)
    tokens_BxL1 = rng.integers(1, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    batch = {
        "inputs": np.ascontiguousarray(tokens_BxL1[:, :-1]),
        "targets": np.ascontiguousarray(tokens_BxL1[:, 1:]),
        "positions": np.tile(index_L % segment_len, (batch_size, 1)),
        "segment_ids": np.tile(1 + index_L // segment_len, (batch_size, 1)),
        "step_end_mask": np.zeros(shape, np.int32),
    }
    if segments_per_row == 0:
        del batch["segment_ids"]
    batch.update({key: np.zeros(shape, np.float32) for key in TARGET_MASKS})
    batch["loss_mask"][:] = 1.0
    batch["thoughts_mask"][:] = 1.0
    return batch


@dataclasses.dataclass
class Harness:
    """What train/loop.py builds for one model: state, jitted step, loss, mesh and rules."""

    model_cfg: ModelConfig
    state: Any  # train.step.TrainState, sharded
    step_fn: Any  # the jitted train step; donates the state
    loss_fn: Any  # loss_fn(params, batch, rng) -> (loss, metrics)
    mesh: Any
    rules: Any


def make_harness(model_cfg: ModelConfig, config) -> Harness:
    """Builds the train state and jitted step of `config.objective` for `model_cfg`."""
    objective = get_objective(config.objective)
    model = Transformer(model_cfg, heads=objective.heads)
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    rules = sharding_lib.get_rules(config.sharding_rules)
    abstract_params, p_shardings = param_shardings(model, mesh, rules)
    tx, schedule = make_optimizer(config.optimizer, config.num_steps, abstract_params)
    _, shardings = state_shardings(abstract_params, p_shardings, tx, mesh)
    loss_fn = objective.make_loss(config, model)
    step_fn = jax.jit(
        functools.partial(
            train_step,
            loss_fn=loss_fn,
            tx=tx,
            schedule=schedule,
            accum_steps=config.grad_accum_steps,
        ),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    state = init_state(model, tx, config.seed, shardings)
    return Harness(model_cfg, state, step_fn, loss_fn, mesh, rules)


def model_config(size: str, seq_len: int, **overrides: Any) -> ModelConfig:
    """Preset `size` with room for seq_len tokens and `overrides` applied."""
    preset = get_preset(size)
    return get_preset(size, max_seq_len=max(preset.max_seq_len, seq_len), **overrides)


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Pass:
    """A compiled pass ready to time: a no-argument call and what compiling it cost."""

    call: Callable[[], Any]
    compile_s: float
    temp_bytes: int | None  # XLA's temporary buffers (activations, scratch)


def compile_passes(harness: Harness, batch_np: dict[str, np.ndarray], passes) -> dict[str, Pass]:
    """Compiles each of `passes` on one batch.

    The train step's call takes over (and donates) `harness.state`; the other passes read
    a copy of the parameters, so they can run between train steps.
    """
    rng = jax.random.PRNGKey(0)
    compiled_passes = {}
    with sharding_lib.use_rules(harness.mesh, harness.rules):
        batch = to_global(batch_np, harness.mesh, harness.rules)
        params = None
        if set(passes) - {"train_step"}:
            params = jax.tree.map(jnp.copy, harness.state.params)
        for name in passes:
            if name == "train_step":
                compiled, compile_s = common.time_compile(harness.step_fn, harness.state, batch)
                call = common.Stepper(compiled, harness.state, batch)
            else:
                fn = harness.loss_fn
                if name == "forward_backward":
                    fn = jax.value_and_grad(fn, has_aux=True)
                compiled, compile_s = common.time_compile(jax.jit(fn), params, batch, rng)
                call = functools.partial(compiled, params, batch, rng)
            memory = compiled.memory_analysis()
            temp_bytes = getattr(memory, "temp_size_in_bytes", None)
            compiled_passes[name] = Pass(call, compile_s, temp_bytes)
    return compiled_passes


def make_row(
    label: str,
    model_cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    passes: dict[str, Pass],
    timings: dict[str, common.Timing],
    peaks: dict[str, float],
) -> dict[str, Any]:
    """One result row: model, batch, and per pass its times, tokens/s and MFU per peak."""
    tokens = batch_size * seq_len
    flops_per_token = model_cfg.flops_per_token(seq_len)
    results = {}
    for name, compiled in passes.items():
        tokens_per_s = tokens / timings[name].best_s
        flops_per_s = tokens_per_s * flops_per_token * PASS_FLOPS[name]
        results[name] = {
            **timings[name].to_json(),
            "compile_s": compiled.compile_s,
            "temp_bytes": compiled.temp_bytes,
            "tokens_per_s": tokens_per_s,
            "model_flops_per_s": flops_per_s,
            "mfu": {dtype: flops_per_s / peak for dtype, peak in peaks.items()},
        }
    return {
        "label": label,
        "model": dataclasses.asdict(model_cfg),
        "params": model_cfg.num_params(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_batch": tokens,
        "flops_per_token": flops_per_token,
        "passes": results,
    }


def table_row(row: dict[str, Any], default: dict[str, Any] | None) -> dict[str, Any]:
    """The printed cells of a result row; MFU is against the peak of its compute dtype."""
    dtype = row["model"]["dtype"]
    cells = {"label": row["label"], "params_m": row["params"] / 1e6, "batch": row["batch_size"]}
    for name, result in row["passes"].items():
        cells[f"{name}_tps"] = result["tokens_per_s"]
        cells[f"{name}_mfu"] = result["mfu"][dtype]
    step = row["passes"]["train_step"]
    cells["step_ms"] = 1e3 * step["best_s"]
    cells["compile_s"] = step["compile_s"]
    if step["temp_bytes"] is not None:
        cells["temp_mb"] = step["temp_bytes"] / 2**20
    if default is not None:
        cells["vs_default"] = step["tokens_per_s"] / default["passes"]["train_step"]["tokens_per_s"]
    return cells


COLUMNS = (
    ("label", "model", ""),
    ("params_m", "params M", ".2f"),
    ("batch", "batch", "d"),
    ("forward_tps", "fwd tok/s", "si"),
    ("forward_mfu", "fwd MFU", ".1%"),
    ("forward_backward_tps", "fwd+bwd tok/s", "si"),
    ("forward_backward_mfu", "fwd+bwd MFU", ".1%"),
    ("train_step_tps", "step tok/s", "si"),
    ("train_step_mfu", "step MFU", ".1%"),
    ("step_ms", "step ms", ".1f"),
    ("vs_default", "vs default", ".2f"),
    ("temp_mb", "temp MiB", ".0f"),
    ("compile_s", "compile s", ".1f"),
)


def run(settings: Settings) -> dict[str, Any]:
    """Compiles every size and variant, times them all round-robin; returns the results."""
    config = sft.get_config()
    entries = []  # (label, model config, batch size, compiled passes)
    jobs = [(size, size, {}, PASSES) for size in settings.sizes]
    for variant in settings.variants:
        size = settings.variant_size
        jobs.append((f"{size} {variant}", size, VARIANTS[variant], ("train_step",)))
    for label, size, overrides, passes in jobs:
        cfg = model_config(size, settings.seq_len, **overrides)
        batch_size = settings.batch_sizes[size]
        batch_np = synthetic_batch(
            batch_size, settings.seq_len, cfg.vocab_size, settings.segments_per_row
        )
        entries.append(
            (label, cfg, batch_size, compile_passes(make_harness(cfg, config), batch_np, passes))
        )
        print(f"  compiled {label}", flush=True)

    # One round-robin over every pass and the peaks: every ratio in the table divides two
    # numbers taken in the same rounds.
    ceilings = common.ceiling_calls(peak_n=settings.peak_n)
    calls = {f"{label}/{name}": p.call for label, *_, ps in entries for name, p in ps.items()}
    calls.update({name: call for name, (call, _) in ceilings.items()})
    timings = common.time_interleaved(calls, warmup=settings.warmup, repeats=settings.repeats)
    peaks = {
        name.removeprefix("peak_"): rate
        for name, rate in common.ceiling_rates(timings, ceilings).items()
    }
    rows = []
    for label, cfg, batch_size, passes in entries:
        row_timings = {name: timings[f"{label}/{name}"] for name in passes}
        rows.append(make_row(label, cfg, batch_size, settings.seq_len, passes, row_timings, peaks))

    defaults = {row["label"]: row for row in rows}
    cells = [table_row(row, defaults.get(row["label"].split()[0])) for row in rows]
    print(common.format_table(cells, COLUMNS))
    print(
        f"matmul peak (jnp.dot {settings.peak_n}^2): "
        + ", ".join(f"{dtype} {common.format_si(peak)}FLOP/s" for dtype, peak in peaks.items())
    )
    return {
        "settings": dataclasses.asdict(settings),
        "peaks_flops": peaks,
        "peak_timings": {name: timings[name].to_json() for name in ceilings},
        "rows": rows,
    }


def main(argv: list[str]) -> None:
    """Runs the benchmark and writes --out."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.write_results(FLAGS.out, run(settings_from_flags()))


if __name__ == "__main__":
    common.define_common_flags()
    flags.DEFINE_list("sizes", ["tiny", "small", "base"], "Model presets, smallest first.")
    flags.DEFINE_list("batch_sizes", ["tiny:32", "small:16", "base:8"], "Rows per batch by size.")
    flags.DEFINE_integer("seq_len", 512, "Tokens per row.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run: {sorted(VARIANTS)}.")
    flags.DEFINE_string("variant_size", "base", "The size the variants change.")
    flags.DEFINE_integer(
        "segments_per_row", 4, "Packed sequences per row; 0: unpacked rows without segment ids."
    )
    flags.DEFINE_integer("warmup", 1, "Untimed rounds after compiling.")
    flags.DEFINE_integer("repeats", 3, "Timed rounds; rates use each call's fastest.")
    flags.DEFINE_integer(
        "peak_n", 2048, "Size of the jnp.dot that measures each peak (8192 on a GPU)."
    )
    app.run(main)
