"""A run killed with SIGKILL and started again continues exactly like an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, run_cli, subprocess_env
from train import checkpoint
from train.metrics import read_metrics

STEPS = 30
# Enough steps after the first checkpoint that the kill lands mid-run, at a moment that
# varies from run to run: a tiny step with its share of the checkpoints takes ~0.1 s on an
# idle 2-core CPU, so the kill, at most ~0.7 s after checkpoint 5, lands by step ~12.
ARGS = ("--config=sft.py:tiny", f"--config.num_steps={STEPS}", "--config.checkpoint_every=5")


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_cli("train.main", *ARGS, f"--workdir={straight}")

    env = subprocess_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.main", *ARGS, f"--workdir={killed}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while (checkpoint.latest_step(killed) or 0) < 5:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # a random moment after it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(killed)
    assert killed_at is not None and killed_at < STEPS, "the kill came too late to test resume"

    run_cli("train.main", *ARGS, f"--workdir={killed}")
    expected, resumed = losses(straight), losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == expected  # bit-identical on CPU: same state, same batches, same rng
