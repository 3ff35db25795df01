"""Run metrics: `metrics.jsonl`, TensorBoard events, a progress bar, and the matmul peak.

Only JAX process 0 writes. `metrics.jsonl` holds one JSON object per logged step; a run
that resumes from a checkpoint first drops the lines logged after that checkpoint, so the
file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul on the default device: the MFU denominator."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()  # compile
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricsWriter:
    """Writes logged steps to metrics.jsonl and TensorBoard, and drives a progress bar."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._progress = None
        if not self.enabled:
            return
        truncate_metrics(self.path, start_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=workdir)
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, status=""
            )
            self._progress.start()

    def write(self, step: int, metrics: dict) -> None:
        """Logs one step's metrics (host values) everywhere."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        if self._progress is not None:
            status = f"loss {record.get('loss', float('nan')):.4f}"
            if "tokens_per_sec" in record:
                status += f"  {record['tokens_per_sec']:.0f} tok/s"
            self._progress.update(self._task, completed=step, status=status)

    def write_summary(self, step: int, prefix: str, values: dict) -> None:
        """Logs scalar results (e.g. evaluation accuracy) to TensorBoard only."""
        if self.enabled:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Flushes TensorBoard and stops the progress bar."""
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops lines with step > last_step (logged after the checkpoint we resume from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
