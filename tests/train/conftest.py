"""Shared fixtures for trainer tests: the tiny SFT config and one finished tiny run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from train.configs import sft

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
    """The `sft.py:tiny` config with dotted-key overrides, unlocked for tests."""
    config = sft.get_config("tiny")
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


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
