"""Batch producers: where the loop's batches come from.

A producer hands the loop one host-local batch (a dict of numpy arrays, this process's
rows) per step, and saves and restores its position with the checkpoint. Supervised
objectives read a Grain pipeline; RL objectives register a producer that runs a rollout
phase with the current parameters. The loop only sees this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import grain
import jax
import ml_collections


class BatchProducer(Protocol):
    """What the loop needs from a source of batches."""

    def next(self, state) -> dict[str, Any]:
        """The next host-local batch; `state` is the current TrainState (RL samples with it)."""
        ...

    def save_args(self):
        """Orbax args that save this producer's position."""
        ...

    def restore_args(self):
        """Orbax args that restore this producer's position in place."""
        ...


ProducerFactory = Callable[..., BatchProducer]
PRODUCERS: dict[str, ProducerFactory] = {}


def register(name: str):
    """Decorator registering a producer factory `(config, prepared, model) -> producer`."""

    def wrap(factory: ProducerFactory) -> ProducerFactory:
        PRODUCERS[name] = factory
        return factory

    return wrap


def make_producer(name: str, config: ml_collections.ConfigDict, prepared, model) -> BatchProducer:
    """Builds the producer registered as `name`."""
    if name not in PRODUCERS:
        raise KeyError(f"Unknown batch producer {name!r}; registered: {sorted(PRODUCERS)}")
    return PRODUCERS[name](config, prepared, model)


def local_batch_size(global_batch_size: int) -> int:
    """Rows this process contributes to a global batch."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"batch_size={global_batch_size} does not split over {count} processes")
    return global_batch_size // count


class GrainProducer:
    """Batches from a Grain dataset; its iterator state goes into the checkpoint."""

    def __init__(self, dataset):
        self.iterator = iter(dataset)

    def next(self, state) -> dict[str, Any]:
        """The next batch of the pipeline (the train state is not needed)."""
        del state
        return next(self.iterator)

    def save_args(self):
        """Saves the iterator's state next to the train state."""
        return grain.checkpoint.CheckpointSave(self.iterator)

    def restore_args(self):
        """Restores the iterator's state in place."""
        return grain.checkpoint.CheckpointRestore(self.iterator)


@register("sft")
def make_sft_producer(config, prepared, model) -> GrainProducer:
    """Packed SFT batches of the train split, sharded by JAX process."""
    del model
    from data.builder import load_split
    from data.pipeline import make_sft_dataset

    d = config.data
    dataset = make_sft_dataset(
        load_split(prepared.builder, "train"),
        prepared.tokenizer,
        seq_len=d.seq_len,
        batch_size=local_batch_size(config.batch_size),
        seed=config.seed,
        shuffle=d.shuffle,
        num_epochs=None,
        pack=d.pack,
        answer_only=d.answer_only,
        num_workers=d.num_workers,
        prefetch=d.prefetch,
    )
    return GrainProducer(dataset)
