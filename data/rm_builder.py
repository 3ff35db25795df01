"""Reward-model data on disk and back: a TFDS builder of labelled responses, a Grain pipeline.

A record is one response to one problem, with what the reward models learn from it:

  tokens          int32 [T]  prompt (the generation prompt) + response token ids
  prompt_length   int32      where the response starts in `tokens`
  step_positions  int32 [S]  indices into `tokens` of the "\\n" ending each thought step,
                             then of a finished response's <|eot_id|>: the answer step
  orm_label       float32    1.0 if the verifier accepts the response's answer
  step_labels     float32 [S] hard label per step: 1 good, 0 wrong
  step_values     float32 [S] soft label per step (Monte-Carlo success rate; = hard otherwise)
  step_mask       float32 [S] 0 where a step is unlabelled (e.g. after the first wrong one)
  source          "policy" (sampled), "corrupted" (known first wrong step) or "clean"

plus its task, prompt and response text. Records are produced by rl.rm_data, which samples
from a policy, so the builder takes a `make_splits` callable that runs only when the data
is missing; reading needs nothing but the folder. The builder config's name is a hash of
what shaped the records (the caller's `spec`), so a changed spec builds a new folder.

The pipeline packs records into fixed-shape rows (first-fit, one example never split):

  inputs, positions, segment_ids        int32 [b, L]   segment_ids 0 = padding
  loss_mask                             float32 [b, L] response tokens
  orm_mask, orm_target                  float32 [b, L] 1 / label at each record's last token
  step_end_mask, step_target            float32 [b, L] step mask / label at each step end
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

SOURCES = ("policy", "corrupted", "clean")
TOKEN_FEATURES = ("inputs", "loss_mask", "orm_mask", "orm_target", "step_end_mask", "step_target")
BATCH_FEATURES = (*TOKEN_FEATURES, "positions", "segment_ids")

MakeSplits = Callable[[], Mapping[str, Iterable[Mapping[str, Any]]]]


@dataclasses.dataclass(eq=False)
class RewardDataConfig(tfds.core.BuilderConfig):
    """Builder config carrying the spec that shaped the records, as canonical JSON."""

    spec: str = dataclasses.field(default="{}", repr=False)


class ThinkaxRewardData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Responses labelled for outcome and process reward models."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Policy samples and corrupted traces with ORM and step labels.",
        "1.1.0": "A finished response's <|eot_id|> is a step too: the answer step.",
    }

    def __init__(self, *, make_splits: MakeSplits | None = None, **kwargs):
        self._make_splits = make_splits
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # As in data.builder: no checksums next to the code, and no importlib_resources.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # Records keep the order they were generated in (a corrupted trace next to its clean one).
        return tfds.core.DatasetInfo(builder=self, features=features(), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        if self._make_splits is None:
            raise ValueError(
                f"reward data {self.builder_config.name} is not built in {self.data_dir}; "
                "build it with rl.rm_data.prepare_rm_data (train.main does for an RM run)"
            )
        splits = self._make_splits()
        return {name: self._generate_examples(records) for name, records in splits.items()}

    def _generate_examples(self, records: Iterable[Mapping[str, Any]]):
        for i, record in enumerate(records):
            check_record(record)
            yield i, dict(record)


def features() -> tfds.features.FeaturesDict:
    """The record schema (see the module docstring)."""
    text = tfds.features.Text()
    floats = tfds.features.Sequence(np.float32)
    return tfds.features.FeaturesDict(
        {
            "task": text,
            "prompt": text,
            "response": text,  # decoded response, without the closing <|eot_id|>
            "source": text,
            "tokens": tfds.features.Sequence(np.int32),
            "prompt_length": np.int32,
            "step_positions": tfds.features.Sequence(np.int32),
            "orm_label": np.float32,
            "step_labels": floats,
            "step_values": floats,
            "step_mask": floats,
        }
    )


def make_rm_builder(
    spec: Mapping[str, Any], data_dir: str, make_splits: MakeSplits | None = None
) -> ThinkaxRewardData:
    """The builder for `spec`, under `data_dir/thinkax_reward_data/<hash of spec>/<version>`."""
    spec_json = json.dumps(spec, sort_keys=True)
    name = "r" + hashlib.sha256(spec_json.encode()).hexdigest()[:16]
    config = RewardDataConfig(name=name, description=spec_json, spec=spec_json)
    return ThinkaxRewardData(
        config=config, data_dir=data_dir, file_format="array_record", make_splits=make_splits
    )


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether the builder's folder holds finished data (TFDS writes it atomically)."""
    return os.path.isfile(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))


def check_record(record: Mapping[str, Any]) -> None:
    """Raises if a record's fields disagree (lengths, positions inside the response)."""
    n_tokens, n_steps = len(record["tokens"]), len(record["step_positions"])
    lengths = {len(record[k]) for k in ("step_labels", "step_values", "step_mask")}
    if lengths != {n_steps}:
        raise ValueError(f"step fields have lengths {lengths}, expected {n_steps}")
    if not 0 < record["prompt_length"] <= n_tokens:
        raise ValueError(f"prompt_length {record['prompt_length']} outside 1..{n_tokens}")
    positions = np.asarray(record["step_positions"], np.int64)
    if positions.size and (
        positions.min() < record["prompt_length"] or positions.max() >= n_tokens
    ):
        raise ValueError("a step position lies outside the response")
    if record["source"] not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {record['source']!r}")


# ---------------------------------------------------------------------------- reading


def encode_rm_example(record: Mapping[str, Any], *, soft_targets: bool = False) -> dict:
    """One record as unpadded per-token arrays [T] (see the module docstring)."""
    tokens_T = np.asarray(record["tokens"], np.int32)
    T, prompt_len = tokens_T.size, int(record["prompt_length"])
    positions_S = np.asarray(record["step_positions"], np.int64)
    labels_S = record["step_values"] if soft_targets else record["step_labels"]
    example = {key: np.zeros((T,), np.float32) for key in TOKEN_FEATURES if key != "inputs"}
    example["inputs"] = tokens_T
    example["loss_mask"][prompt_len:] = 1.0
    example["orm_mask"][T - 1] = 1.0
    example["orm_target"][T - 1] = record["orm_label"]
    example["step_end_mask"][positions_S] = np.asarray(record["step_mask"], np.float32)
    example["step_target"][positions_S] = np.asarray(labels_S, np.float32)
    return example


def make_rm_dataset(
    source: Sequence[Mapping[str, Any]],
    *,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool = True,
    soft_targets: bool = False,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Packed batches of `batch_size` rows of `seq_len` tokens for this shard (this process).

    Records longer than `seq_len` are dropped, with a warning saying how many (an error if
    all are). `num_epochs=None` repeats forever; the iterator's state is checkpointable.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    records = grain.MapDataset.source(source)[shard_index::shard_count]
    lengths = [len(records[i]["tokens"]) for i in range(len(records))]
    kept = sum(n <= seq_len for n in lengths)
    if not kept:
        raise ValueError(
            f"none of the {len(lengths)} reward records fit seq_len={seq_len} (longest: "
            f"{max(lengths, default=0)} tokens); raise data.seq_len"
        )
    if kept < len(lengths):
        logging.warning(
            "Dropping %d of %d reward records longer than seq_len=%d.",
            len(lengths) - kept,
            len(lengths),
            seq_len,
        )
    if shuffle:
        records = records.shuffle(seed % 2**32)
    examples = (
        records.repeat(num_epochs)
        .filter(lambda record: len(record["tokens"]) <= seq_len)
        .map(functools.partial(encode_rm_example, soft_targets=soft_targets))
        .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size))
    )
    padding = {key: pad_id if key == "inputs" else 0 for key in TOKEN_FEATURES}
    rows = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={key: seq_len for key in TOKEN_FEATURES},
        num_packing_bins=batch_size,
        shuffle_bins=False,
        padding_struct=padding,
    )
    stack = functools.partial(_stack_rows, batch_size=batch_size, padding=padding)
    return rows.batch(batch_size, batch_fn=stack)


def _stack_rows(rows: Sequence[dict], *, batch_size: int, padding: Mapping[str, int]) -> dict:
    """Stacks packed rows into a batch, renamed, topped up with empty rows to `batch_size`."""
    batch = {key: np.stack([row[key] for row in rows]) for key in TOKEN_FEATURES}
    batch["positions"] = np.stack([row["inputs_positions"] for row in rows]).astype(np.int32)
    batch["segment_ids"] = np.stack([row["inputs_segment_ids"] for row in rows]).astype(np.int32)
    missing = batch_size - len(rows)
    if missing:
        fill = {**padding, "positions": 0, "segment_ids": 0}
        batch = {
            key: np.concatenate([x, np.full((missing, *x.shape[1:]), fill[key], x.dtype)])
            for key, x in batch.items()
        }
    return batch
