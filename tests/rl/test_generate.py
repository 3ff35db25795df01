"""Sampling helpers for several JAX processes: each process's prompts, one call, its own rows.

In one process they reduce to `sampler.sample`. The two-process test starts two real JAX
processes on loopback (2 CPU devices each, gloo collectives), gives each its own prompts of
different lengths on a (2, 2, 1) mesh whose batch and parameters span both processes, and
checks that every process gets back exactly the rows one process sampling all the prompts
gets for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from model import sampler, sharding
from rl import generate
from tests.conftest import REPO, free_port, subprocess_env

# Process 1's longest prompt pads to another width than process 0's.
PROMPTS = ([[5, 9, 17], [3, 1, 4, 1, 5]], [[42, 7], [8] * 17])
OPTIONS = {"max_new_tokens": 5, "stop_tokens": (), "greedy": True}

# Each process: join the run, place the tiny model on the (2, 2, 1) mesh, sample its prompts.
CHILD = textwrap.dedent(
    """
    import functools, json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    address, index, prompts, options = sys.argv[1], int(sys.argv[2]), *map(json.loads, sys.argv[3:])
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=index)
    from model import config, sharding, transformer
    from rl import generate
    cfg = config.get_preset("tiny")
    mesh = sharding.make_mesh((2, 2, 1))
    init = functools.partial(transformer.init_variables, cfg)
    params, _ = sharding.init_sharded(init, jax.random.PRNGKey(0), mesh=mesh, rules="fsdp")
    options["stop_tokens"] = tuple(options["stop_tokens"])
    with sharding.use_rules(mesh, "fsdp"):
        out = generate.sample_rows(params, cfg, prompts, rng=jax.random.PRNGKey(1), **options)
    print("ROWS", json.dumps([out.tokens_BxNxT.tolist(), out.lengths_BxN.tolist()]))
    """
)


def test_in_one_process_sample_rows_is_sample(tiny_cfg, tiny_params):
    prompts = PROMPTS[0] + PROMPTS[1]
    kwargs = {"rng": jax.random.PRNGKey(1), **OPTIONS}
    expected = sampler.sample(tiny_params, tiny_cfg, prompts, **kwargs)
    got = generate.sample_rows(tiny_params, tiny_cfg, prompts, **kwargs)
    assert isinstance(got.tokens_BxNxT, np.ndarray)
    np.testing.assert_array_equal(got.tokens_BxNxT, expected.tokens_BxNxT)
    np.testing.assert_array_equal(got.lengths_BxN, expected.lengths_BxN)
    np.testing.assert_allclose(got.logprobs_BxNxT, expected.logprobs_BxNxT, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 forced CPU devices")
def test_host_value_of_a_sharded_array():
    mesh = sharding.make_mesh((8, 1, 1))
    x = jax.device_put(np.arange(16.0).reshape(8, 2), sharding.batch_sharding(mesh, "dp"))
    np.testing.assert_array_equal(generate.host_value(x), np.arange(16.0).reshape(8, 2))
    rows = generate.all_process_rows({"a": np.array([[1, 2]])})
    assert generate.own_rows(rows, 1)["a"].tolist() == [[1, 2]]


def test_two_processes_each_get_their_own_rows(tiny_cfg, tiny_params):
    address = f"127.0.0.1:{free_port()}"
    env = subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, address, str(i), json.dumps(p), json.dumps(OPTIONS)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, p in enumerate(PROMPTS)
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        line = next(line for line in stdout.splitlines() if line.startswith("ROWS "))
        outputs.append(tuple(map(np.asarray, json.loads(line.removeprefix("ROWS ")))))

    expected = sampler.sample(
        tiny_params, tiny_cfg, PROMPTS[0] + PROMPTS[1], rng=jax.random.PRNGKey(1), **OPTIONS
    )
    for i, (tokens, lengths) in enumerate(outputs):
        rows = slice(2 * i, 2 * i + 2)
        np.testing.assert_array_equal(tokens, np.asarray(expected.tokens_BxNxT)[rows])
        np.testing.assert_array_equal(lengths, np.asarray(expected.lengths_BxN)[rows])
