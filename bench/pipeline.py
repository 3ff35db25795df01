"""Grain SFT pipeline throughput vs what the default SFT train step consumes.

    python -m bench.pipeline --out=bench/results/pipeline.json
    python -m bench.pipeline --workdir=workdirs/sft --out=bench/results/pipeline.json
    python -m bench.pipeline --quick --out=/tmp/pipeline.json

Records are built with the default data config (`data/config.py`) by `data.build.prepare`
into a temporary folder. The pipeline is the trainer's own: the "sft" batch producer of
`train.batches` (`data.pipeline.make_sft_dataset`), shaped by the default SFT config
(`train/configs/sft.py`: seq_len, batch size, packing, prefetch). It is timed over
`--batches` batches after a warmup, alone in the process.

The consumer is the SFT train step: a few real steps of the default SFT model on the
pipeline's own batches (built as in bench/train_step.py), or, with `--workdir`, the median
`tokens_per_sec` a finished run logged (its first window, which holds the compile, skipped).
Tokens count every slot of a batch, padding included, as the trainer's tokens_per_sec does.
"headroom" is pipeline tokens/s over step tokens/s: above 1 the pipeline keeps up.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from bench import common
from bench.train_step import make_harness, measure
from data.build import prepare
from data.config import default_data_config
from train import batches as batches_lib
from train.configs import sft
from train.metrics import read_metrics
from train.workdir import read_config, resolve_model_config

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure."""

    quick: bool
    warmup_batches: int
    batches: int
    step_repeats: int
    workdir: str  # "" measures the train step here


def settings_from_flags() -> Settings:
    """The flags' settings, or the tiny ones under --quick."""
    if FLAGS.quick:
        return Settings(True, 1, 3, 1, FLAGS.workdir or "")
    return Settings(False, 3, FLAGS.batches, FLAGS.repeats, FLAGS.workdir or "")


def configs(quick: bool) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(data config the records are built with, SFT config that shapes and consumes them)."""
    data_config = default_data_config()
    if not quick:
        return data_config, sft.get_config()
    data_config.train_size = 64
    data_config.validation_size = data_config.test_size = 8
    data_config.corrupted_size = 0
    data_config.vocab_size = 512  # a 1024 vocabulary does not fit 64 records' text
    return data_config, sft.get_config("tiny")


# ----------------------------------------------------------------------------- producing


def count_examples(segment_ids_BxL: np.ndarray) -> int:
    """Packed examples in a batch: positions where a nonzero segment starts."""
    starts_BxL = segment_ids_BxL != 0
    starts_BxL[:, 1:] &= segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
    return int(starts_BxL.sum())


def measure_pipeline(producer, *, warmup: int, num_batches: int) -> tuple[dict[str, Any], dict]:
    """(examples/s, tokens/s and totals over num_batches, the last batch) of a producer."""
    for _ in range(warmup):
        batch = producer.next(None)
    examples = real_tokens = tokens = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = producer.next(None)
        examples += count_examples(batch["segment_ids"])
        real_tokens += int(np.count_nonzero(batch["segment_ids"]))
        tokens += batch["inputs"].size
    elapsed = time.perf_counter() - start
    result = {
        "batches": num_batches,
        "seconds": elapsed,
        "examples": examples,
        "tokens": tokens,
        "non_pad_tokens": real_tokens,
        "examples_per_s": examples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "non_pad_tokens_per_s": real_tokens / elapsed,
    }
    return result, batch


# ----------------------------------------------------------------------------- consuming


def measure_step(config, vocab_size: int, batch: dict, repeats: int) -> dict[str, Any]:
    """Tokens/s of real train steps of `config`'s model on one pipeline batch."""
    model_cfg = resolve_model_config(config.model, vocab_size)
    harness = make_harness(model_cfg, config)
    timing = measure(harness, batch, ("train_step",), warmup=1, repeats=repeats)["train_step"]
    return {
        "source": "measured",
        "model": dataclasses.asdict(model_cfg),
        **timing,
        "tokens_per_s": batch["inputs"].size / timing["best_s"],
    }


def logged_step(workdir: str) -> dict[str, Any]:
    """The median tokens_per_sec a run logged in workdir/metrics.jsonl (first window skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise app.UsageError(f"--workdir={workdir} has no metrics.jsonl; is it a train.main run?")
    rates = [r["tokens_per_sec"] for r in read_metrics(path) if "tokens_per_sec" in r]
    if not rates:
        raise app.UsageError(f"{path} logs no tokens_per_sec yet; wait for the first log step")
    config = read_config(workdir)
    return {
        "source": f"logged in {workdir}",
        "logged_windows": len(rates),
        "tokens_per_s": statistics.median(rates[1:] or rates),
        "seq_len": config.data.seq_len,
        "batch_size": config.batch_size,
    }


# ----------------------------------------------------------------------------- the benchmark

COLUMNS = (
    ("label", "", ""),
    ("examples_per_s", "examples/s", "si"),
    ("tokens_per_s", "tokens/s", "si"),
    ("non_pad_tokens_per_s", "non-pad tokens/s", "si"),
    ("headroom", "headroom", ".1f"),
)


def run(settings: Settings) -> dict[str, Any]:
    """Builds the data, times the pipeline and the step; returns the results."""
    data_config, config = configs(settings.quick)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        prepared = prepare(data_config, workdir, verbose=False)
        print(f"built the data in {time.perf_counter() - start:.1f}s", flush=True)
        producer = batches_lib.make_producer("sft", config, prepared, None)
        pipeline, batch = measure_pipeline(
            producer, warmup=settings.warmup_batches, num_batches=settings.batches
        )
        print(f"  measured the pipeline over {settings.batches} batches", flush=True)
        if settings.workdir:
            step = logged_step(settings.workdir)
        else:
            step = measure_step(config, prepared.tokenizer.vocab_size, batch, settings.step_repeats)
        print(f"  measured the train step ({step['source']})", flush=True)

    headroom = pipeline["tokens_per_s"] / step["tokens_per_s"]
    examples_per_token = pipeline["examples"] / pipeline["tokens"]
    rows = [
        {"label": "Grain pipeline", **pipeline, "headroom": headroom},
        {
            "label": f"train step ({step['source']})",
            "examples_per_s": step["tokens_per_s"] * examples_per_token,
            "tokens_per_s": step["tokens_per_s"],
            "non_pad_tokens_per_s": step["tokens_per_s"]
            * pipeline["non_pad_tokens"]
            / pipeline["tokens"],
            "headroom": 1.0,
        },
    ]
    print(common.format_table(rows, COLUMNS))
    print(f"the pipeline produces {headroom:.1f}x the tokens the train step consumes")
    shape = {"seq_len": config.data.seq_len, "batch_size": config.batch_size}
    logged_shape = {key: step[key] for key in shape if key in step}
    if logged_shape and logged_shape != shape:
        print(f"note: the logged run's batches were {logged_shape}, the pipeline's {shape}")
    return {
        "settings": dataclasses.asdict(settings),
        "data_config": data_config.to_dict(),
        "batch_shape": shape,
        "pipeline": pipeline,
        "train_step": step,
        "headroom": headroom,
    }


def main(argv: list[str]) -> None:
    """Runs the benchmark and writes --out."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.write_results(FLAGS.out, run(settings_from_flags()))


if __name__ == "__main__":
    common.define_common_flags()
    flags.DEFINE_integer("batches", 30, "Pipeline batches timed (after 3 warmup batches).")
    flags.DEFINE_integer("repeats", 3, "Train steps timed; rates use the fastest.")
    flags.DEFINE_string("workdir", None, "A finished run whose logged tokens_per_sec to use.")
    app.run(main)
