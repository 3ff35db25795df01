"""Two real JAX processes on loopback train one `sft.py:tiny` run through `train.main`.

Each process has 2 CPU devices and gloo collectives; together they form a (2, 2, 1) mesh.
The run starts from an empty workdir, so the data preparation is shared too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from model import sharding as sharding_lib
from model.transformer import Transformer
from tests.conftest import REPO, build_once, free_port, subprocess_env
from train import checkpoint, workdir
from train.metrics import read_metrics
from train.objectives import get_objective
from train.optim import make_optimizer
from train.state import param_shardings, state_shardings

NUM_PROCESSES, STEPS = 2, 4
ARGS = (
    "--config=sft.py:tiny",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    f"--config.num_steps={STEPS}",
    "--config.checkpoint_every=2",
    "--config.eval.max_new_tokens=4",
)


def launch(workdir_path: str, timeout: float = 400) -> list[str]:
    """Runs the processes to completion; returns each one's stderr (the absl log)."""
    env = subprocess_env(JAX_NUM_CPU_DEVICES="2", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    address = f"127.0.0.1:{free_port()}"
    logs = [f"{workdir_path}.process{i}.log" for i in range(NUM_PROCESSES)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the run
            command = [sys.executable, "-m", "train.main", *ARGS, f"--workdir={workdir_path}"]
            command += [
                f"--coordinator_address={address}",
                f"--num_processes={NUM_PROCESSES}",
                f"--process_id={i}",
            ]
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=f))
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [open(log).read() for log in logs]
    for i, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-4000:]}"
    return texts


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The finished two-process run, once per test run (tests/conftest.py:build_once):
    (workdir, [log of process 0, log of process 1])."""

    def build(folder):
        path = str(folder / "run")
        return path, launch(path)

    return build_once(tmp_path_factory, "multiprocess", build)


def test_processes_read_disjoint_shards(two_process_run):
    _, logs = two_process_run
    rows = []
    for i, log in enumerate(logs):
        match = re.search(rf"Process {i} of 2, first batch rows: ([0-9a-f ]+)", log)
        assert match, f"process {i} logged no first-batch digests"
        rows.append(match.group(1).split())
    assert len(rows[0]) == len(rows[1]) == 4  # batch_size 8 over 2 processes
    assert not set(rows[0]) & set(rows[1])


def test_losses_agree_and_only_process_0_writes_metrics(two_process_run):
    path, logs = two_process_run
    records = read_metrics(os.path.join(path, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once
    logged = dict(re.findall(r"Process 1, step (\d+): loss (\S+)", logs[1]))
    assert {int(k): float(v) for k, v in logged.items()} == {r["step"]: r["loss"] for r in records}
    assert "Process 0, step" not in logs[0]
    assert len([f for f in os.listdir(path) if f.startswith("events.out.tfevents")]) == 1
    assert os.path.exists(os.path.join(path, "eval.json"))


def test_one_checkpoint_restores_in_a_single_process(two_process_run):
    path, _ = two_process_run
    assert checkpoint.latest_step(path) == STEPS
    assert sorted(os.listdir(checkpoint.checkpoint_dir(path))) == ["2", "4"]  # no leftovers

    # Restore the whole train state of the 4-device, 2-process run onto this process's mesh.
    config = workdir.read_config(path)
    model = Transformer(workdir.model_config_of(config), heads=get_objective("sft").heads)
    mesh = sharding_lib.make_mesh((-1, 1, 1))
    abstract_params, p_shardings = param_shardings(model, mesh, sharding_lib.get_rules("fsdp"))
    tx, _ = make_optimizer(config.optimizer, config.num_steps, abstract_params)
    abstract, _ = state_shardings(abstract_params, p_shardings, tx, mesh)
    abstract_train = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
    with ocp.CheckpointManager(
        checkpoint.checkpoint_dir(path), item_names=("params", "train")
    ) as manager:
        restored = manager.restore(
            STEPS,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                train=ocp.args.StandardRestore(abstract_train),
            ),
        )
    params, train = restored["params"], restored["train"]
    assert int(train["step"]) == STEPS
    for x in jax.tree.leaves((params, train)):
        assert np.isfinite(np.asarray(x)).all()
    earlier, _ = checkpoint.load_params(path, step=2)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params, earlier)
    assert max(jax.tree.leaves(moved)) > 0  # steps 3 and 4 trained
