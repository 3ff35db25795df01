"""Entry point: `python -m train.main --config=sft.py[:variant] --workdir=DIR [--config.k=v]`.

A bare config name resolves to train/configs/<name>. The config is locked, so an override
of a key that does not exist, or of the wrong type, fails before any work is done.

Several processes (hosts) join one run before JAX touches a device:
  --distributed                      on Cloud TPU VMs, where each host finds its peers itself;
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   anywhere else (e.g. two
                                     CPU processes on loopback; CPU collectives use gloo).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-host run whose peers JAX finds itself (Cloud TPU VMs)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for an explicit multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_config_path(argv: list[str]) -> list[str]:
    """Rewrites `--config=name.py[:arg]` to train/configs/name.py when `name.py` isn't a path."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, sep, variant = arg[len("--config=") :].partition(":")
            if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path)):
                arg = f"--config={os.path.join(CONFIG_DIR, path)}{sep}{variant}"
        out.append(arg)
    return out


def initialize_distributed() -> None:
    """Joins the multi-process run the flags describe (nothing for a single process)."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise app.UsageError(
                "--coordinator_address, --num_processes and --process_id go together"
            )
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()  # TPU VMs: the peers come from the TPU metadata


def main(argv):
    """Joins the run's processes, logs the devices and runs the configured objective."""
    del argv
    initialize_distributed()  # before anything creates a JAX backend
    from rl.stages import ensure_stages
    from train.loop import run

    logging.info("JAX devices (%d processes): %s", jax.process_count(), jax.devices())
    config, workdir = _CONFIG.value, _WORKDIR.value
    # An RL config names the runs it starts from; the missing ones are trained first.
    ensure_stages(config, workdir)
    run(config, workdir)


if __name__ == "__main__":
    sys.argv = resolve_config_path(sys.argv)
    app.run(main)
