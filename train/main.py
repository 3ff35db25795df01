"""Entry point: `python -m train.main --config=sft.py[:variant] --workdir=DIR [--config.k=v]`.

A bare config name resolves to train/configs/<name>. The config is locked, so an override
of a key that does not exist, or of the wrong type, fails before any work is done.
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


def main(argv):
    """Logs the devices and runs the configured objective."""
    del argv
    from train.loop import run

    logging.info("JAX devices (%d processes): %s", jax.process_count(), jax.devices())
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    sys.argv = resolve_config_path(sys.argv)
    app.run(main)
