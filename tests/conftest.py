"""Shared test setup: eight forced CPU devices, a tiny model and one finished tiny SFT run.

XLA reads XLA_FLAGS once, when JAX first creates its CPU backend. pytest imports this root
conftest before any test module, so adding the flag here at import time is the earliest point
that works: sharding tests then see 8 devices while single-device tests run on device 0.

The fixtures live here, not in a package's conftest, so that session fixtures (the tiny run
above all) are built once per test session whichever folders use them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import pickle
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
    # Every program, not only those that take JAX's default second to compile: each process
    # compiles hundreds of small ones (eager ops, short jitted helpers) that the other worker
    # and the CLI subprocesses compile again. tests/model and tests/rl: 495 -> 457 CPU s.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The test processes compile with LLVM at its "less" optimization level, not XLA's default
# (3, aggressive): compiling is most of what these tests spend, and the level only sets how
# hard LLVM optimizes the machine code of the same XLA program. tests/model/test_transformer.py
# with the RL loop tests: 250 -> 185 CPU s, run time included. The subprocesses a test
# starts (subprocess_env) compile at the same level: `train.main --config=sft.py:tiny`,
# 29 -> 21 CPU s.
OPTIMIZATION_FLAG = "--xla_backend_optimization_level=1"
_TEST_FLAGS = {
    "xla_force_host_platform_device_count": "--xla_force_host_platform_device_count=8",
    "xla_backend_optimization_level": OPTIMIZATION_FLAG,
}
for _name, _flag in _TEST_FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from model import config, transformer  # noqa: E402
from model import sharding as sharding_lib  # noqa: E402
from train.configs import sft  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def loop_on_one_device():
    """Runs of train.loop in this process build a one-device mesh, on the first forced device.

    The loop's mesh takes every device there is, here the eight this file forces, and
    compiling a step for eight devices costs ~1.5x what one device does (the toy-reward PPO
    and GRPO runs: 88 -> 59 CPU s). Tests whose subject is not sharding use this; that each
    objective trains the same on any mesh is tests/train/test_mesh_equivalence.py's subject.
    """
    one_device = functools.partial(sharding_lib.make_mesh, devices=jax.devices()[:1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding_lib, "make_mesh", one_device)
        yield


@pytest.fixture
def one_device_loop():
    """loop_on_one_device() for one test."""
    with loop_on_one_device():
        yield


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


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts (a CLI run, a kernel, one of several
    processes): one CPU device, as a user's run on a CPU machine has, not the tests' eight;
    the tests' optimization level; the run's compilation cache; `extra` on top."""
    return {**os.environ, "XLA_FLAGS": OPTIMIZATION_FLAG, "JAX_PLATFORMS": "cpu", **extra}


def run_cli(module: str, *args: str, timeout: float = 600, check: bool = True):
    """Runs `python -m module args...` from the repo root; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def build_once(tmp_path_factory, name: str, build):
    """`build(folder)`'s result, built once per test run however xdist spreads its users.

    Fixtures belong to one xdist worker, and xdist can send the tests that share a costly
    one (the benchmark runs, the two-process run, the reward-model runs) to both workers,
    often at the same time, so each built it. Here the first worker to ask builds it in a
    folder of the run's temp dir, which the workers share, and pickles the result there;
    a file lock makes the other wait for it, then load it. `build` must leave what the
    tests read in `folder` or in its result, and the tests must not change either.
    Without xdist this is `build` in a fresh temp folder.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # the run's; each worker's is inside
    folder, result_file = shared / name, shared / f"{name}.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if result_file.exists():
            with open(result_file, "rb") as f:
                return pickle.load(f)
        shutil.rmtree(folder, ignore_errors=True)  # left by a worker whose build failed
        folder.mkdir()
        result = build(folder)
        with open(f"{result_file}.tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(f"{result_file}.tmp", result_file)  # whole, or not there
        return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished `sft.py:tiny` run (through the real CLI), made once per test run
    (build_once): its workdir, which tests read but never change."""

    def build(folder):
        run_cli("train.main", "--config=sft.py:tiny", f"--workdir={folder}")
        return str(folder)

    return build_once(tmp_path_factory, "tiny_sft", build)
