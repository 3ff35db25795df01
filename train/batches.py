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
from jax.sharding import NamedSharding

from model import sharding as sharding_lib


class BatchProducer(Protocol):
    """What the loop needs from a source of batches."""

    def next(self, state) -> dict[str, Any]:
        """The next host-local batch; `state` is the current TrainState (RL samples with it).

        Arrays have this process's rows on axis 0; `inputs` [b, L] must be present (the loop
        counts its tokens for throughput)."""
        ...

    def save_args(self):
        """Orbax args that save this producer's position."""
        ...

    def restore_args(self):
        """Orbax args that restore this producer's position in place."""
        ...

    def host_metrics(self) -> dict[str, float]:
        """Host-side numbers about the last batch (rollout time, rewards...), logged with it."""
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


def to_global(local: dict[str, Any], mesh, rules) -> dict[str, Any]:
    """Host-local rows -> global arrays whose leading axis is split over the batch mesh axes."""

    def place(x):
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        logical = ("batch",) + (None,) * (x.ndim - 1)
        spec = sharding_lib.logical_to_spec(logical, global_shape, mesh.shape, rules)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree.map(place, local)


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

    def host_metrics(self) -> dict[str, float]:
        """Nothing beyond what the step computes."""
        return {}


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
        multiturn_fraction=d.multiturn_fraction,
        num_workers=d.num_workers,
        prefetch=d.prefetch,
    )
    return GrainProducer(dataset)


@register("rm")
def make_rm_producer(config, prepared, model) -> GrainProducer:
    """Packed reward-model batches (data.rm_builder), built from the SFT policy if missing."""
    del model
    from data.rm_builder import make_rm_dataset
    from rl.rm_data import load_rm_split

    dataset = make_rm_dataset(
        load_rm_split(config, prepared, "train"),
        seq_len=config.data.seq_len,
        batch_size=local_batch_size(config.batch_size),
        pad_id=prepared.tokenizer.pad_id,
        seed=config.seed,
        shuffle=config.data.shuffle,
        soft_targets=config.rm_data.soft_targets,
    )
    return GrainProducer(dataset)


# RL producers: a rollout phase with the current parameters (rl/rollout.py), one per kind of
# training rows (PPO, GRPO, expert iteration, preference pairs), registered as rollout_<kind>.
from rl import rollout as _rollout  # noqa: E402

for _kind in _rollout.KINDS:
    register(f"rollout_{_kind}")(_rollout.producer_factory(_kind))
