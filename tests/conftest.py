"""Shared test setup: eight forced CPU devices and a tiny model.

XLA reads XLA_FLAGS once, when JAX first creates its CPU backend. pytest imports this root
conftest before any test module, so adding the flag here at import time is the earliest point
that works: sharding tests then see 8 devices while single-device tests run on device 0.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from model import config, transformer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg() -> config.ModelConfig:
    """The `tiny` preset: vocab 128, d_model 32, 2 layers, 4 heads over 2 kv heads."""
    return config.get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Plain float32 parameters of the tiny model (scanned layers, untied head)."""
    return transformer.init_params(tiny_cfg, jax.random.PRNGKey(0))
