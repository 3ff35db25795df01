"""Rollout tokens/s: the KV-cache sampler vs full recomputation vs the roofline bounds.

    python -m bench.decode --out=bench/results/decode.json
    python -m bench.decode --quick --out=/tmp/decode.json

For each batch B, prompt length P and number of new tokens T (random-init model, random
prompts, no stop token, so every row decodes all T tokens):

  cache      `model.sampler.sample`: prefill once, then one token per step through the KV
             cache in jitted `lax.while_loop`s, one per 64-step phase, each phase attending
             over the slots it can reach. Tokens/s = B * T / wall time (prefill included).
  recompute  the same sampling without a cache: every step re-runs the model on the whole
             sequence, padded to the fixed length P + T so it compiles once and loops in one
             jit (`lax.fori_loop`). Each step costs the same, so only `--recompute_steps` steps
             are timed and tokens/s = B * steps / time.
  bound      the memory-bandwidth bound of a decode step: it must read the weights once and
             every row's cached keys and values; bytes / measured copy bandwidth = the fastest
             step possible. The cache holds P + (T + 1) / 2 tokens on average over the rollout.
  compute    the compute bound of a decode step: its forward FLOPs (2 per matmul weight per
             row, plus attention over the cached tokens) / the matmul peak of the model's
             compute dtype, measured with a large `jnp.dot` in the same rounds. At batch 64
             a small model on a CPU does more arithmetic per byte read than the machine's
             FLOP/byte ratio, so this bound, not the bandwidth one, is the one a perfect
             sampler would hit.

Each case compiles both, then times cache, recompute, a memory copy (the bandwidth) and the
matmul (the peak) round-robin, so the ratios divide numbers taken under the same machine load.

"speedup" is cache / recompute tokens/s, "of bound" is cache / bandwidth-bound tokens/s and
"of roofline" is cache / min(bandwidth bound, compute bound) tokens/s.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import common
from model.config import PRESETS, ModelConfig, get_preset
from model.sampler import choose_tokens, sample
from model.transformer import Transformer, init_params

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure."""

    model: str
    num_kv_heads: int  # 0: the preset's
    batch_sizes: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    new_tokens: tuple[int, ...]
    recompute_steps: int
    repeats: int
    copy_bytes: int
    peak_n: int


def settings_from_flags() -> Settings:
    """The flags' settings, or the tiny ones under --quick."""
    if FLAGS.quick:
        return Settings("tiny", 0, (1, 4), (16,), (8,), 4, 2, 1 << 24, 256)
    return Settings(
        FLAGS.model,
        FLAGS.num_kv_heads,
        tuple(int(b) for b in FLAGS.batch_sizes),
        tuple(int(p) for p in FLAGS.prompt_lens),
        tuple(int(t) for t in FLAGS.new_tokens),
        FLAGS.recompute_steps,
        FLAGS.repeats,
        FLAGS.copy_mib << 20,
        FLAGS.peak_n,
    )


# ----------------------------------------------------------------------------- the baseline


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps", "greedy"))
def recompute_sample(
    params,
    cfg: ModelConfig,
    tokens_BxS: jax.Array,
    prompt_len: int | jax.Array,
    rng: jax.Array,
    *,
    num_steps: int,
    greedy: bool = False,
) -> jax.Array:
    """Writes num_steps sampled tokens after the prompt, re-running the model on all S each step.

    Without a cache: the fair baseline for `model.sampler.sample` (same token choice, and
    only the one needed position is projected to logits).
    """
    model = Transformer(cfg)

    def step(t, tokens_BxS):
        out = model.apply({"params": params}, tokens_BxS, compute_logits=False, method="forward")
        # Padding after the prompt is causally invisible to the last real position.
        last = prompt_len + t - 1
        hidden_Bx1xD = jax.lax.dynamic_slice_in_dim(out.hidden_BxLxD, last, 1, axis=1)
        logits_BxV = model.apply({"params": params}, hidden_Bx1xD, method="unembed")[:, 0]
        token_B = choose_tokens(
            logits_BxV, jax.random.fold_in(rng, t), 1.0, top_k=0, top_p=1.0, greedy=greedy
        )
        return jax.lax.dynamic_update_slice_in_dim(tokens_BxS, token_B[:, None], last + 1, axis=1)

    return jax.lax.fori_loop(0, num_steps, step, tokens_BxS)


# ----------------------------------------------------------------------------- the bound


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float) -> float:
    """Bytes one decode step must read: weights once, plus `context` cached tokens per row."""
    weight_bytes = jnp.dtype(cfg.weight_dtype).itemsize
    # An untied embedding table is only gathered (B rows), not read whole.
    read_params = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    kv_bytes_per_token *= jnp.dtype(cfg.compute_dtype).itemsize
    return read_params * weight_bytes + batch * context * kv_bytes_per_token


def bound_tokens_per_s(cfg: ModelConfig, batch: int, prompt: int, new: int, bandwidth: float):
    """Decoded tokens/s if every step only paid for its memory reads at `bandwidth` bytes/s."""
    context = prompt + (new + 1) / 2
    return batch * bandwidth / decode_bytes_per_step(cfg, batch, context)


def compute_tokens_per_s(cfg: ModelConfig, prompt: int, new: int, peak_flops: float) -> float:
    """Decoded tokens/s if every step only paid for its forward FLOPs at `peak_flops`."""
    context = prompt + (new + 1) / 2
    # flops_per_token counts forward + backward (6 per weight); a decode step is the forward.
    return peak_flops / (cfg.flops_per_token(context) / 3)


# ----------------------------------------------------------------------------- measuring


def measure_case(
    params, cfg: ModelConfig, batch: int, prompt: int, new: int, settings: Settings
) -> dict[str, Any]:
    """Cache, recompute and bound tokens/s for one (batch, prompt, new tokens) case."""
    rng = jax.random.PRNGKey(0)
    data_rng = np.random.default_rng(batch * 1000 + prompt)
    tokens_BxP = data_rng.integers(1, cfg.vocab_size, (batch, prompt), dtype=np.int32)
    lengths_B = np.full((batch,), prompt, np.int32)

    def cached():
        return sample(
            params, cfg, (tokens_BxP, lengths_B), rng=rng, max_new_tokens=new, stop_tokens=()
        ).tokens_BxNxT

    start = time.perf_counter()
    jax.block_until_ready(cached())  # compiles, then runs once
    first_call_s = time.perf_counter() - start

    steps = min(new, settings.recompute_steps)
    padded_BxS = np.zeros((batch, prompt + new), np.int32)
    padded_BxS[:, :prompt] = tokens_BxP
    padded_BxS = jnp.asarray(padded_BxS)
    compiled, recompute_compile_s = common.time_compile(
        recompute_sample, params, cfg, padded_BxS, prompt, rng, num_steps=steps
    )

    ceilings = {
        "copy": common.copy_call(settings.copy_bytes),
        "peak": common.matmul_call(settings.peak_n, jnp.dtype(cfg.compute_dtype).name),
    }
    calls = {
        "cache": cached,
        "recompute": functools.partial(compiled, params, padded_BxS, prompt, rng),
        **{name: call for name, (call, _) in ceilings.items()},
    }
    timings = common.time_interleaved(calls, warmup=0, repeats=settings.repeats)
    rates = common.ceiling_rates(timings, ceilings)
    bandwidth, peak = rates["copy"], rates["peak"]
    cache_tps = batch * new / timings["cache"].best_s
    recompute_tps = batch * steps / timings["recompute"].best_s
    bound_tps = bound_tokens_per_s(cfg, batch, prompt, new, bandwidth)
    compute_tps = compute_tokens_per_s(cfg, prompt, new, peak)
    return {
        "batch": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "cache": {
            **timings["cache"].to_json(),
            "tokens_per_s": cache_tps,
            "first_call_s": first_call_s,
        },
        "recompute": {
            **timings["recompute"].to_json(),
            "steps": steps,
            "padded_len": prompt + new,
            "tokens_per_s": recompute_tps,
            "compile_s": recompute_compile_s,
        },
        "bound": {
            "copy_bandwidth_bytes_per_s": bandwidth,
            "copy_timing": timings["copy"].to_json(),
            "bytes_per_step": decode_bytes_per_step(cfg, batch, prompt + (new + 1) / 2),
            "tokens_per_s": bound_tps,
        },
        "compute": {
            "matmul_peak_flops": peak,
            "peak_timing": timings["peak"].to_json(),
            "tokens_per_s": compute_tps,
        },
        "cache_speedup": cache_tps / recompute_tps,
        "fraction_of_bound": cache_tps / bound_tps,
        "fraction_of_roofline": cache_tps / min(bound_tps, compute_tps),
    }


COLUMNS = (
    ("batch", "batch", "d"),
    ("prompt_len", "prompt", "d"),
    ("new_tokens", "new", "d"),
    ("cache_tps", "cache tok/s", "si"),
    ("recompute_tps", "recompute tok/s", "si"),
    ("cache_speedup", "speedup", ".1f"),
    ("bound_tps", "bound tok/s", "si"),
    ("fraction_of_bound", "of bound", ".1%"),
    ("compute_tps", "compute tok/s", "si"),
    ("fraction_of_roofline", "of roofline", ".1%"),
    ("first_call_s", "1st call s", ".1f"),
)


def table_row(case: dict[str, Any]) -> dict[str, Any]:
    """The printed cells of one case."""
    return {
        **{key: case[key] for key in ("batch", "prompt_len", "new_tokens")},
        "cache_tps": case["cache"]["tokens_per_s"],
        "recompute_tps": case["recompute"]["tokens_per_s"],
        "cache_speedup": case["cache_speedup"],
        "bound_tps": case["bound"]["tokens_per_s"],
        "fraction_of_bound": case["fraction_of_bound"],
        "compute_tps": case["compute"]["tokens_per_s"],
        "fraction_of_roofline": case["fraction_of_roofline"],
        "first_call_s": case["cache"]["first_call_s"],
    }


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Cache speedups at the most new tokens; bound and roofline fractions at the largest batch."""
    most_new = max(case["new_tokens"] for case in cases)
    largest = max(case["batch"] for case in cases)
    return {
        "new_tokens": most_new,
        "cache_speedup": {
            f"batch={c['batch']},prompt={c['prompt_len']}": c["cache_speedup"]
            for c in cases
            if c["new_tokens"] == most_new
        },
        "batch": largest,
        "fraction_of_bound": {
            f"prompt={c['prompt_len']},new={c['new_tokens']}": c["fraction_of_bound"]
            for c in cases
            if c["batch"] == largest
        },
        "fraction_of_roofline": {
            f"prompt={c['prompt_len']},new={c['new_tokens']}": c["fraction_of_roofline"]
            for c in cases
            if c["batch"] == largest
        },
    }


def bench_model(name: str) -> ModelConfig:
    """A model preset, or the model shape a train.main workdir recorded (random weights)."""
    if name in PRESETS:
        return get_preset(name)
    from train.workdir import model_config_of, read_config

    return model_config_of(read_config(name))


def run(settings: Settings) -> dict[str, Any]:
    """Measures every case; returns the results (cases, summary, bandwidth)."""
    longest = max(settings.prompt_lens) + max(settings.new_tokens)
    preset = bench_model(settings.model)
    cfg = dataclasses.replace(
        preset,
        max_seq_len=max(preset.max_seq_len, longest),
        num_kv_heads=settings.num_kv_heads or preset.num_kv_heads,
    )
    params = init_params(cfg, jax.random.PRNGKey(0))
    print(
        f"model {settings.model}: {cfg.num_params() / 1e6:.2f}M params, "
        f"{cfg.num_kv_heads} kv heads",
        flush=True,
    )
    cases = []
    grid = itertools.product(settings.batch_sizes, settings.prompt_lens, settings.new_tokens)
    for batch, prompt, new in grid:
        cases.append(measure_case(params, cfg, batch, prompt, new, settings))
        print(f"  measured batch={batch} prompt={prompt} new={new}", flush=True)
    print(common.format_table([table_row(case) for case in cases], COLUMNS))
    bandwidths = [case["bound"]["copy_bandwidth_bytes_per_s"] for case in cases]
    print(
        f"copy bandwidth (read + write): {common.format_si(min(bandwidths))}-"
        f"{common.format_si(max(bandwidths))}B/s over the cases"
    )
    summary = summarize(cases)
    print(f"cache speedup at {summary['new_tokens']} new tokens:")
    for key, value in summary["cache_speedup"].items():
        print(f"  {key}: {value:.1f}x")
    print(f"cache tokens/s as a fraction of the bandwidth bound at batch {summary['batch']}:")
    for key, value in summary["fraction_of_bound"].items():
        print(f"  {key}: {value:.1%}")
    print(f"cache tokens/s as a fraction of the roofline at batch {summary['batch']}:")
    for key, value in summary["fraction_of_roofline"].items():
        print(f"  {key}: {value:.1%}")
    return {
        "settings": dataclasses.asdict(settings),
        "model": dataclasses.asdict(cfg),
        "params": cfg.num_params(),
        "cases": cases,
        "summary": summary,
    }


def main(argv: list[str]) -> None:
    """Runs the benchmark and writes --out."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.write_results(FLAGS.out, run(settings_from_flags()))


if __name__ == "__main__":
    common.define_common_flags()
    flags.DEFINE_string(
        "model", "small", "Model preset, or a train.main workdir whose model shape to use."
    )
    flags.DEFINE_integer("num_kv_heads", 0, "KV heads (0: the model's).")
    flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Rows decoded together.")
    flags.DEFINE_list("prompt_lens", ["32", "128"], "Prompt tokens per row (powers of two).")
    flags.DEFINE_list("new_tokens", ["64", "256"], "Tokens generated per row.")
    flags.DEFINE_integer("recompute_steps", 4, "Recompute steps timed (each costs the same).")
    flags.DEFINE_integer("repeats", 3, "Timed rounds; rates use each call's fastest.")
    flags.DEFINE_integer("peak_n", 1024, "Size of the jnp.dot that measures the peak.")
    flags.DEFINE_integer(
        "copy_mib", 256, "MiB copied to measure the bandwidth (4096 on a GPU, past launch costs)."
    )
    app.run(main)
