"""Objectives: loss functions that plug into the one trainer loop.

An objective is registered under a name and chosen by `config.objective`. Its factory
builds a pure loss function from the config and the model:

    loss_fn(params, batch, rng) -> (scalar loss, {name: scalar metric})

The loop (train/loop.py) never branches on which objective runs. An objective also names
the scalar heads its model needs (reward models add "reward", the PPO critic "value") and
the batch producer that feeds it (train/batches.py): Grain for supervised data, a rollout
phase for RL; and the evaluation that judges it (train/evaluate.py): greedy accuracy for
policies, AUC for reward models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

Params = Any
Batch = dict[str, Any]
LossFn = Callable[[Params, Batch, Any], tuple[Any, dict[str, Any]]]
LossFactory = Callable[[ml_collections.ConfigDict, Any], LossFn]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered objective: its loss factory, model heads and batch producer name."""

    name: str
    make_loss: LossFactory  # (config, model) -> loss_fn
    heads: tuple[str, ...] = ()  # scalar heads the model must carry
    batches: str = "sft"  # a name in train.batches.PRODUCERS
    evaluation: str = "generate"  # a name in train.evaluate.EVALUATIONS


OBJECTIVES: dict[str, Objective] = {}


def register(
    name: str, *, heads: tuple[str, ...] = (), batches: str = "sft", evaluation: str = "generate"
):
    """Decorator registering a loss factory as objective `name`."""

    def wrap(make_loss: LossFactory) -> LossFactory:
        if name in OBJECTIVES:
            raise ValueError(f"Objective {name!r} is registered twice")
        OBJECTIVES[name] = Objective(name, make_loss, heads, batches, evaluation)
        return make_loss

    return wrap


def get_objective(name: str) -> Objective:
    """Looks up an objective by name, with a message listing the known ones."""
    if name not in OBJECTIVES:
        raise KeyError(f"Unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


# Importing the modules registers their objectives.
from train.objectives import reward, rl, sft  # noqa: E402,F401
