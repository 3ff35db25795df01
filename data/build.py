"""Writes a workdir's tokenizer and TFDS data; `python -m data.build --workdir=DIR`.

    python -m data.build --workdir=/tmp/run [--config=train/configs/sft.py]
        [--config.data.train_size=500]

Without --config the default data config is used (`data/config.py`). With a training config,
its `.data` is used. Rebuilding is idempotent: an existing `tokenizer.model` is kept, and data
already built for the same record-shaping config is reused.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from data import builder as builder_lib
from data import format as fmt
from data.tokenizer import Tokenizer, adapt_tokenizer, train_tokenizer

TOKENIZER_FILE = "tokenizer.model"
DATA_FOLDER = "data"
LOCAL_DATA_CACHE = os.path.expanduser("~/.cache/thinkax/data")  # data of remote workdirs


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A workdir's tokenizer and prepared data."""

    tokenizer: Tokenizer
    data_dir: str  # the prepared dataset's own folder; `load_split(data_dir, split)` reads it
    builder: tfds.core.DatasetBuilder


def prepare(data_config: Mapping[str, Any], workdir: str, *, verbose: bool = True) -> Prepared:
    """Builds (or reuses) the data and `workdir/tokenizer.model`; prints task counts.

    Data goes to `workdir/data`, or, for a remote workdir (gs://...), to a local cache on each
    host: ArrayRecord cannot write to cloud storage, and the records are deterministic in the
    config, so every host builds the same ones. Of several processes, process 0 builds what
    they share (and trains the tokenizer) while the others wait for it.
    """
    workdir = epath.Path(workdir)
    data_root = data_root_for(workdir)
    tokenizer_file = workdir / TOKENIZER_FILE
    builder = None
    if jax.process_index() == 0 or is_remote(workdir):
        builder = _build_data(data_config, data_root)
    if jax.process_index() == 0 and not tokenizer_file.exists():
        tokenizer = make_tokenizer(data_config, builder)
        workdir.mkdir(parents=True, exist_ok=True)
        tokenizer_file.write_bytes(tokenizer.proto_bytes)
        logging.info("Wrote %s (vocab size %d)", tokenizer_file, tokenizer.vocab_size)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("data.build.prepare")
    if builder is None:
        builder = builder_lib.make_builder(data_config, os.fspath(data_root))
    tokenizer = Tokenizer.from_proto(tokenizer_file.read_bytes())
    if verbose:
        print(format_counts(builder_lib.task_counts(builder)))
    return Prepared(tokenizer=tokenizer, data_dir=os.fspath(builder.data_dir), builder=builder)


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is a URI such as gs://bucket/run rather than a local path."""
    return "://" in os.fspath(path)


def data_root_for(workdir: epath.PathLike) -> epath.Path:
    """Where a workdir's TFDS data lives: inside it if local, else in LOCAL_DATA_CACHE."""
    if is_remote(workdir):
        return epath.Path(LOCAL_DATA_CACHE)
    return epath.Path(workdir) / DATA_FOLDER


def _build_data(data_config: Mapping[str, Any], data_root: epath.Path):
    """The builder for `data_config` under `data_root`, its splits written if not yet there."""
    builder = builder_lib.make_builder(data_config, os.fspath(data_root))
    if not _is_prepared(builder):
        logging.info("Building data into %s", builder.data_dir)
        tfds.display_progress_bar(False)  # per-split bars would flood training logs
        builder.download_and_prepare()
    return builder


def make_tokenizer(data_config: Mapping[str, Any], builder: tfds.core.DatasetBuilder) -> Tokenizer:
    """Adapts `tokenizer_path` if set, else trains on train dialogues, with and without thinking."""
    if data_config["tokenizer_path"]:
        tokenizer, added = adapt_tokenizer(data_config["tokenizer_path"])
        logging.info("Adapted %s: %d special tokens added", data_config["tokenizer_path"], added)
        return tokenizer
    return train_tokenizer(
        tokenizer_corpus(builder, data_config["tokenizer_corpus_size"]),
        vocab_size=data_config["vocab_size"],
        model_type=data_config["tokenizer_model_type"],
        spell_words=data_config["tokenizer_spell_words"],
    )


def tokenizer_corpus(builder: tfds.core.DatasetBuilder, size: int) -> list[str]:
    """Rendered dialogues of `size` train records spread over the split, both renders each."""
    source = builder_lib.load_split(builder, "train")
    if len(source) == 0:
        raise ValueError("the train split is empty; cannot train a tokenizer on it")
    # Evenly spaced, so that records appended at the end (GSM8K) are represented too.
    indices = np.unique(np.linspace(0, len(source) - 1, min(size, len(source))).astype(int))
    texts = []
    for i in indices:
        problem = builder_lib.record_to_problem(source[int(i)])
        for answer_only in (False, True):
            texts.append(fmt.render_dialogue(fmt.problem_to_dialogue(problem, answer_only)))
    return texts


def format_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """A table of records per task (rows) and split (columns)."""
    splits = list(counts)
    tasks = sorted({task for per_task in counts.values() for task in per_task})
    width = max([len("task"), len("total"), *map(len, tasks)])
    header = "task".ljust(width) + "".join(f"{split:>22}" for split in splits)
    lines = [header]
    for task in [*tasks, "total"]:
        cells = [
            sum(counts[split].values()) if task == "total" else counts[split].get(task, 0)
            for split in splits
        ]
        lines.append(task.ljust(width) + "".join(f"{cell:>22}" for cell in cells))
    return "\n".join(lines)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether the builder's folder already holds finished data (TFDS writes it atomically)."""
    return (epath.Path(builder.data_dir) / "dataset_info.json").is_file()


def main(argv: list[str]) -> None:
    """Prepares the workdir named by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    prepare(flags.FLAGS.config.data, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined here, not at import, so that train.main can import `prepare`
    # next to its own --config flag.
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py"),
        "A config file whose `.data` is the data config (default: data/config.py).",
    )
    flags.DEFINE_string("workdir", None, "Where tokenizer.model and data/ go.", required=True)
    app.run(main)
