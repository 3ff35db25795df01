"""An RL run killed with SIGKILL mid-rollout resumes exactly like an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, run_cli, subprocess_env
from tests.train.test_rl_objectives import shared_policy_workdir
from train import checkpoint
from train.metrics import read_metrics

STEPS = 32  # 8 rollouts of 2 epochs x 2 minibatches
COMPARED = ("loss", "policy_loss", "value_loss", "rollout/reward", "rollout/kl_ref")


def args(policy: str, workdir: str) -> list[str]:
    # Checkpoints every 3 steps land mid-buffer (a rollout serves 4 minibatches). The random
    # policy never earns a reward, so without the entropy bonus every loss would be 0 and the
    # policy would never move: the bonus gives each step a gradient, so the losses, the
    # rollouts and their KL to the reference depend on the parameters, buffer and rng restored.
    return [
        "--config=rl.py:tiny,algo=ppo",
        f"--config.init_from={policy}",
        f"--config.num_steps={STEPS}",
        "--config.checkpoint_every=3",
        "--config.rl.entropy_coef=0.01",
        "--config.rl.compare.table=False",
        f"--workdir={workdir}",
    ]


def start(policy: str, workdir: str) -> subprocess.Popen:
    env = subprocess_env()
    return subprocess.Popen(
        [sys.executable, "-m", "train.main", *args(policy, workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def logged(workdir: str) -> dict[int, tuple]:
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: tuple(r[k] for k in COMPARED) for r in records}


def wait_for_first_checkpoint(proc: subprocess.Popen, workdir: str) -> None:
    deadline = time.time() + 400
    while (checkpoint.latest_step(workdir) or 0) < 3:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 400 s"
        time.sleep(0.2)


def test_sigkill_mid_rollout_then_resume_matches_uninterrupted_run(tmp_path, tmp_path_factory):
    policy = shared_policy_workdir(tmp_path_factory)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    uninterrupted = start(policy, straight)
    # The run to kill starts once the uninterrupted one has checkpointed, and runs alongside
    # the rest of it: by then the train step, the sampler and the forwards are compiled and
    # in the run's compilation cache (tests/conftest.py), so it loads them instead of
    # compiling them a second time.
    wait_for_first_checkpoint(uninterrupted, straight)
    proc = start(policy, killed)
    wait_for_first_checkpoint(proc, killed)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # a random moment after it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(killed)
    assert killed_at is not None and killed_at < STEPS, "the kill came too late to test resume"

    run_cli("train.main", *args(policy, killed))
    assert uninterrupted.wait(timeout=400) == 0
    expected, resumed = logged(straight), logged(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for key in ("loss", "value_loss", "rollout/kl_ref"):  # they move: a real run to compare
        i = COMPARED.index(key)
        assert len({values[i] for values in expected.values()}) > 1, key
    # Bit-identical on CPU: same parameters, same rollout buffer, same rng, same KL coefficient.
    assert resumed == expected
