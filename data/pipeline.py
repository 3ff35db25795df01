"""Grain pipeline from TFDS records to packed, fixed-shape SFT batches.

    records -> shard by process -> shuffle (reseeded each epoch) -> repeat -> encode
            -> drop examples longer than seq_len -> first-fit pack -> batch

Each example is a whole dialogue. Its targets are its own next tokens, and its last token's
target is padding with loss 0, so targets never cross into the next packed segment. Rows
hold whole examples only. Examples longer than seq_len are dropped and counted (a warning
at 1, 2, 4, ... drops); an epoch with nothing left raises, naming seq_len and the longest
example. The returned `grain.IterDataset`'s iterator has exact
`get_state()/set_state()`: a restored iterator yields the very next batch. Batches:

  inputs, targets, positions, segment_ids   int32 [B, seq_len]   segment_ids 0 = padding
  loss_mask, headline_mask, thoughts_mask,
  summary_mask, answer_mask                 float32 [B, seq_len] aligned to targets
  step_end_mask                             int32 [B, seq_len]   aligned to inputs
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from data import format as fmt
from data.builder import record_to_problem
from data.multiturn import multiturn_example

TARGET_MASKS = fmt.TARGET_MASKS
SEQUENCE_FEATURES = ("inputs", "targets", *TARGET_MASKS, "step_end_mask")
BATCH_FEATURES = (*SEQUENCE_FEATURES, "positions", "segment_ids")
_EPOCH = "epoch"  # per-example epoch index, read (and removed) by the length filter


def make_sft_dataset(
    source: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    pack: bool = True,
    answer_only: bool = False,
    multiturn_fraction: float = 0.0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    prefetch: int = 0,
) -> grain.IterDataset:
    """Batches of `batch_size` rows for this shard (default: this JAX process), see module doc.

    `num_epochs=None` repeats forever. The last batch of a finite run is filled up with empty
    rows (segment_ids 0), so every batch has the same shape. `pack=False` puts one example per
    row. `num_workers > 0` encodes in that many processes; `prefetch > 0` keeps that many
    batches ready in a background thread. `multiturn_fraction` of the examples become
    redacted multi-turn dialogues of follow-up questions (`data.multiturn`), drawn per
    (seed, repeated index) so every epoch mixes differently.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if not 0.0 <= multiturn_fraction <= 1.0:
        raise ValueError(f"multiturn_fraction must be in [0, 1], got {multiturn_fraction}")
    if answer_only and multiturn_fraction > 0:
        raise ValueError("multiturn dialogues keep thinking blocks: use answer_only=False")
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    records = grain.MapDataset.source(source)[shard_index::shard_count]
    epoch_len = len(records)
    if epoch_len == 0:
        raise ValueError(
            f"shard {shard_index} of {shard_count} is empty: the split has {len(source)} records"
        )
    if shuffle:
        records = records.shuffle(seed % 2**32)
    encode = functools.partial(
        _encode_example,
        tokenizer=tokenizer,
        answer_only=answer_only,
        epoch_len=epoch_len,
        seed=seed,
        multiturn_fraction=multiturn_fraction,
    )
    # Encode a few batches ahead, not grain's default 500 examples (wasted at the end of a run).
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size)
    examples = records.repeat(num_epochs).map_with_index(encode).to_iter_dataset(read)
    if num_workers > 0:
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    examples = _DropTooLongIterDataset(examples, seq_len=seq_len)
    padding = {
        key: tokenizer.pad_id if key in ("inputs", "targets") else 0 for key in SEQUENCE_FEATURES
    }
    rows = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={key: seq_len for key in SEQUENCE_FEATURES},
        num_packing_bins=batch_size,
        shuffle_bins=False,
        padding_struct=padding,
        max_sequences_per_bin=None if pack else 1,
    )
    batches = rows.batch(
        batch_size,
        batch_fn=functools.partial(_stack_rows, batch_size=batch_size, padding=padding),
    )
    if prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=prefetch
        )
    return batches


def make_eval_records(source: Sequence[Mapping[str, Any]], n: int | None = None) -> list[dict]:
    """The first `n` records (all if None) with `meta` parsed: what an evaluator samples from."""
    count = len(source) if n is None else min(n, len(source))
    records = [source[i] for i in range(count)]
    return [{**record, "meta": json.loads(record["meta"])} for record in records]


def encode_record(record: Mapping[str, Any], tokenizer, answer_only: bool = False) -> dict:
    """One decoded record as unpacked training arrays (targets shifted within the example)."""
    problem = record_to_problem(record)
    encoded = fmt.encode_dialogue(fmt.problem_to_dialogue(problem, answer_only), tokenizer)
    tokens_T = encoded.tokens.astype(np.int32)
    example = {
        "inputs": tokens_T,
        "targets": np.append(tokens_T[1:], np.int32(tokenizer.pad_id)).astype(np.int32),
        "step_end_mask": encoded.step_end.astype(np.int32),
    }
    for key in TARGET_MASKS:
        # The mask of the token each position predicts; nothing follows the last token.
        example[key] = np.append(getattr(encoded, key)[1:], 0).astype(np.float32)
    return example


def _encode_example(
    index: int,
    record: Mapping[str, Any],
    *,
    tokenizer,
    answer_only: bool,
    epoch_len: int,
    seed: int,
    multiturn_fraction: float,
) -> dict:
    """`encode_record` (or, for a `multiturn_fraction` of indices, a multi-turn dialogue
    built on the record), tagged with the epoch its (repeated) index falls in."""
    example = None
    if (
        multiturn_fraction > 0
        and np.random.default_rng([seed, index]).random() < multiturn_fraction
    ):
        # None when the record's answer is not a whole number: it stays a single turn.
        example = multiturn_example(record_to_problem(record), tokenizer, seed=seed, index=index)
    if example is None:
        example = encode_record(record, tokenizer, answer_only)
    return {**example, _EPOCH: index // epoch_len}


def _stack_rows(rows: Sequence[dict], *, batch_size: int, padding: Mapping[str, int]) -> dict:
    """Stacks packed rows into a batch, renamed, topped up with empty rows to `batch_size`."""
    batch = {
        **{key: np.stack([row[key] for row in rows]) for key in SEQUENCE_FEATURES},
        "positions": np.stack([row["inputs_positions"] for row in rows]),
        "segment_ids": np.stack([row["inputs_segment_ids"] for row in rows]),
    }
    missing = batch_size - len(rows)
    if missing:
        fill = {**padding, "positions": 0, "segment_ids": 0}
        batch = {
            key: np.concatenate([x, np.full((missing, *x.shape[1:]), fill[key], x.dtype)])
            for key, x in batch.items()
        }
    return batch


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """The explicit shard, else this JAX process's."""
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return shard_index, shard_count


class _DropTooLongIterDataset(grain.IterDataset):
    """Drops examples longer than `seq_len`; raises if a whole epoch is dropped."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return _DropTooLongIterator(self._parent.__iter__(), self._seq_len)


class _DropTooLongIterator(grain.DatasetIterator):
    """Iterator of `_DropTooLongIterDataset`; its counters are part of its state."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._counters = {
            "epoch": 0,
            "seen_in_epoch": 0,
            "kept_in_epoch": 0,
            "dropped": 0,
            "longest": 0,
        }

    def __next__(self) -> dict:
        c = self._counters
        while True:
            try:
                example = next(self._parent)
            except StopIteration:
                self._check_epoch()
                raise
            epoch = int(example[_EPOCH])
            example = {key: value for key, value in example.items() if key != _EPOCH}
            if epoch != c["epoch"]:
                self._check_epoch()
                c.update(epoch=epoch, seen_in_epoch=0, kept_in_epoch=0)
            c["seen_in_epoch"] += 1
            length = len(example["inputs"])
            c["longest"] = max(c["longest"], length)
            if length <= self._seq_len:
                c["kept_in_epoch"] += 1
                return example
            c["dropped"] += 1
            if c["dropped"] & (c["dropped"] - 1) == 0:  # log at 1, 2, 4, 8, ... drops
                logging.warning(
                    "Dropped %d examples longer than seq_len=%d so far (longest: %d tokens).",
                    c["dropped"],
                    self._seq_len,
                    c["longest"],
                )

    def _check_epoch(self) -> None:
        """Raises if every example of the epoch that just ended was too long."""
        c = self._counters
        if c["seen_in_epoch"] and not c["kept_in_epoch"]:
            raise ValueError(
                f"All {c['seen_in_epoch']} examples of epoch {c['epoch']} are longer than "
                f"seq_len={self._seq_len} tokens (longest: {c['longest']}); raise data.seq_len "
                "or make the tasks shorter."
            )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), **self._counters}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counters = {key: int(state[key]) for key in self._counters}
