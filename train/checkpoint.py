"""Orbax checkpoints: parameters, optimizer state and the data iterator in one step.

Each checkpoint step holds three items:
  - "params": the model parameters (all that inference needs; restored alone by
    `load_params`);
  - "train": the optimizer state, the step and the rng;
  - "data": the batch producer's state (the Grain iterator, or a rollout producer's), so
    that a resumed run sees exactly the batch it would have seen.
Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous steps intact. Restoring against abstract arrays that carry
shardings reshards on the fly, so a checkpoint from one mesh loads onto another. The
workdir may be local or a gs:// URI.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath

from train.step import TrainState
from train.workdir import absolute


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    """`workdir/checkpoints`, made absolute when local (Orbax wants absolute paths)."""
    return absolute(workdir) / "checkpoints"


def make_manager(
    workdir: str, *, keep: int, async_save: bool, keep_steps: tuple[int, ...] = ()
) -> ocp.CheckpointManager:
    """A CheckpointManager over `workdir/checkpoints` keeping the last `keep` steps.

    Steps in `keep_steps` are kept too, once saved: a later stage may start from one (the
    reward models sample an under-trained SFT checkpoint, train/configs/rm.py).
    """
    policies = ocp.checkpoint_managers
    preservation = policies.LatestN(keep)
    if keep_steps:
        preservation = policies.AnyPreservationPolicy(
            [preservation, policies.CustomSteps(list(keep_steps))]
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_names=("params", "train", "data"),
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, data_args) -> None:
    """Saves the state and the batch producer's state as checkpoint `step`."""
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            data=data_args,
        ),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState, data_args) -> TrainState:
    """Restores the latest step onto the shardings carried by `abstract_state`."""
    step = manager.latest_step()
    abstract_train = {
        "step": abstract_state.step,
        "opt_state": abstract_state.opt_state,
        "rng": abstract_state.rng,
    }
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore(abstract_train),
            data=data_args,
        ),
    )
    train = restored["train"]
    return TrainState(
        step=train["step"],
        params=restored["params"],
        opt_state=train["opt_state"],
        rng=train["rng"],
    )


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None."""
    path = checkpoint_dir(workdir)
    if not path.is_dir():
        return None
    with ocp.CheckpointManager(path, item_names=("params",)) as manager:
        return manager.latest_step()


def _params_manager(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of the "params" item; raises if `workdir` has no checkpoints."""
    path = checkpoint_dir(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoints in {workdir}: run train.main there first")
    # A handler given up front (not just the item name) makes the saved shapes readable, so
    # a checkpoint from any topology (another mesh, several hosts) restores anywhere.
    return ocp.CheckpointManager(path, item_handlers={"params": ocp.StandardCheckpointHandler()})


def _step_or_latest(manager: ocp.CheckpointManager, step: int | None) -> int:
    """`step`, or the newest complete one; raises if there is none."""
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{manager.directory} holds no complete checkpoint")
    elif step not in manager.all_steps():
        have = sorted(manager.all_steps())
        raise FileNotFoundError(f"{manager.directory} has no checkpoint {step} (has {have})")
    return step


def params_metadata(workdir: str, step: int | None = None):
    """(tree of the saved parameters' shapes and dtypes, step), without reading any array."""
    with _params_manager(workdir) as manager:
        step = _step_or_latest(manager, step)
        return manager.item_metadata(step)["params"], step


def load_params(workdir: str, abstract_params=None, step: int | None = None):
    """Restores only the parameters of checkpoint `step` (default: newest) of `workdir`.

    With `abstract_params` (ShapeDtypeStructs with shardings, the saved tree's structure)
    the arrays land in those shards, on any mesh and across processes; without, they land
    on this process's first device with the saved shapes.
    """
    with _params_manager(workdir) as manager:
        step = _step_or_latest(manager, step)
        if abstract_params is None:
            metadata = manager.item_metadata(step)["params"]
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata
            )
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
    return restored["params"], step
