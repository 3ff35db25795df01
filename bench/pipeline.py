"""Grain SFT pipeline throughput vs what the default SFT train step consumes.

    python -m bench.pipeline --out=bench/results/pipeline.json
    python -m bench.pipeline --workdir=workdirs/sft --out=bench/results/pipeline.json
    python -m bench.pipeline --quick --out=/tmp/pipeline.json

Records are built with the default data config (`data/config.py`) by `data.build.prepare`
into a temporary folder. The pipeline is the trainer's own: the "sft" batch producer of
`train.batches` (`data.pipeline.make_sft_dataset`), shaped by the default SFT config
(`train/configs/sft.py`: seq_len, batch size, packing). Its prefetch thread is turned off,
so the time counted is the pipeline's own work, not a lead the thread built up meanwhile.

The consumer is the SFT train step: real steps of the default SFT model on a pipeline
batch (built as in bench/train_step.py), timed round-robin with the pipeline (each round
pulls `--batches_per_round` batches, then runs one step). With `--workdir`, it is instead
the median `tokens_per_sec` a finished run logged (its first window, which holds the
compile, skipped). Tokens count every slot of a batch, padding included, as the trainer's
tokens_per_sec does. "headroom" is pipeline tokens/s over step tokens/s: above 1 the
pipeline keeps up.
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
from bench.train_step import compile_passes, make_harness
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
    batches_per_round: int
    rounds: int
    workdir: str  # "" measures the train step here


def settings_from_flags() -> Settings:
    """The flags' settings, or the tiny ones under --quick."""
    workdir = FLAGS.workdir or ""
    if FLAGS.quick:
        return Settings(True, 2, 2, workdir)
    return Settings(False, FLAGS.batches_per_round, FLAGS.rounds, workdir)


def configs(quick: bool) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(data config the records are built with, SFT config that shapes and consumes them)."""
    data_config = default_data_config()
    config = sft.get_config("tiny" if quick else None)
    config.data.prefetch = 0
    if quick:
        data_config.train_size = 64
        data_config.validation_size = data_config.test_size = 8
        data_config.corrupted_size = 0
        data_config.vocab_size = 512  # a 1024 vocabulary does not fit 64 records' text
    return data_config, config


# ----------------------------------------------------------------------------- producing


def count_examples(segment_ids_BxL: np.ndarray) -> int:
    """Packed examples in a batch: positions where a nonzero segment starts."""
    starts_BxL = segment_ids_BxL != 0
    starts_BxL[:, 1:] &= segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
    return int(starts_BxL.sum())


class PipelineReader:
    """Pulls `num_batches` batches per call from a producer; totals count every pulled batch."""

    def __init__(self, producer, num_batches: int):
        self.producer, self.num_batches = producer, num_batches
        self.totals = {"batches": 0, "examples": 0, "tokens": 0, "non_pad_tokens": 0}
        self.last_batch = None

    def __call__(self) -> None:
        for _ in range(self.num_batches):
            batch = self.producer.next(None)
            self.totals["batches"] += 1
            self.totals["examples"] += count_examples(batch["segment_ids"])
            self.totals["tokens"] += batch["inputs"].size
            self.totals["non_pad_tokens"] += int(np.count_nonzero(batch["segment_ids"]))
            self.last_batch = batch


def pipeline_rates(reader: PipelineReader, timing: common.Timing) -> dict[str, Any]:
    """Tokens/s of the fastest call, and examples and non-pad tokens at the pulled shares."""
    totals = reader.totals
    tokens_per_s = reader.num_batches * reader.last_batch["inputs"].size / timing.best_s
    return {
        **timing.to_json(),
        **totals,
        "batches_per_call": reader.num_batches,
        "tokens_per_s": tokens_per_s,
        "examples_per_s": tokens_per_s * totals["examples"] / totals["tokens"],
        "non_pad_tokens_per_s": tokens_per_s * totals["non_pad_tokens"] / totals["tokens"],
    }


# ----------------------------------------------------------------------------- consuming


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


def measure(config, prepared, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline rates, train step rates), timed round-robin unless the step is logged."""
    producer = batches_lib.make_producer("sft", config, prepared, None)
    reader = PipelineReader(producer, settings.batches_per_round)
    reader()  # the first batch starts Grain's threads; also the batch the step trains on
    calls = {"pipeline": reader}
    if not settings.workdir:
        model_cfg = resolve_model_config(config.model, prepared.tokenizer.vocab_size)
        harness = make_harness(model_cfg, config)
        passes = compile_passes(harness, reader.last_batch, ("train_step",))
        calls["train_step"] = passes["train_step"].call
    timings = common.time_interleaved(calls, warmup=0, repeats=settings.rounds)
    pipeline = pipeline_rates(reader, timings["pipeline"])
    if settings.workdir:
        return pipeline, logged_step(settings.workdir)
    step = {
        "source": "measured",
        "model": dataclasses.asdict(model_cfg),
        **timings["train_step"].to_json(),
        "tokens_per_s": reader.last_batch["inputs"].size / timings["train_step"].best_s,
    }
    return pipeline, step


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
        pipeline, step = measure(config, prepared, settings)

    headroom = pipeline["tokens_per_s"] / step["tokens_per_s"]
    per_token = {key: pipeline[key] / pipeline["tokens"] for key in ("examples", "non_pad_tokens")}
    rows = [
        {"label": "Grain pipeline", **pipeline, "headroom": headroom},
        {
            "label": f"train step ({step['source']})",
            "examples_per_s": step["tokens_per_s"] * per_token["examples"],
            "tokens_per_s": step["tokens_per_s"],
            "non_pad_tokens_per_s": step["tokens_per_s"] * per_token["non_pad_tokens"],
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
    flags.DEFINE_integer("batches_per_round", 10, "Pipeline batches pulled per round.")
    flags.DEFINE_integer("rounds", 3, "Timed rounds (pipeline batches, then one train step).")
    flags.DEFINE_string("workdir", None, "A finished run whose logged tokens_per_sec to use.")
    app.run(main)
