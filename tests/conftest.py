"""Shared test setup: eight forced CPU devices, a tiny model and one finished tiny SFT run.

XLA reads XLA_FLAGS once, when JAX first creates its CPU backend. pytest imports this root
conftest before any test module, so adding the flag here at import time is the earliest point
that works: sharding tests then see 8 devices while single-device tests run on device 0.

The fixtures live here, not in a package's conftest, so that session fixtures (the tiny run
above all) are built once per test session whichever folders use them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile

# One persistent XLA compilation cache for the whole run: the xdist workers and every
# subprocess a test starts (CLI runs, SIGKILL and resume, multi-process runs) inherit this
# variable, so a program compiled once is loaded, not recompiled, by the next process that
# builds it. Set here, before any process of the run imports jax, in the first one (pytest's
# main process), and removed when that process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="thinkax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from model import config, transformer  # noqa: E402
from train.configs import sft  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_cfg() -> config.ModelConfig:
    """The `tiny` preset: vocab 128, d_model 32, 2 layers, 4 heads over 2 kv heads."""
    return config.get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Plain float32 parameters of the tiny model (scanned layers, untied head)."""
    return transformer.init_params(tiny_cfg, jax.random.PRNGKey(0))


def apply_overrides(config, overrides):
    """Sets each dotted key of `overrides` ("optimizer.lr") in `config`; returns `config`."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


def tiny_config(**overrides):
    """The `sft.py:tiny` config with dotted-key overrides, unlocked for tests."""
    return apply_overrides(sft.get_config("tiny"), overrides)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(module: str, *args: str, timeout: float = 600, check: bool = True):
    """Runs `python -m module args...` from the repo root; returns the CompletedProcess."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished `sft.py:tiny` run (through the real CLI): its workdir."""
    workdir = str(tmp_path_factory.mktemp("tiny_sft"))
    run_cli("train.main", "--config=sft.py:tiny", f"--workdir={workdir}")
    return workdir
