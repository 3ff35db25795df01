"""Run metrics: `metrics.jsonl`, TensorBoard events, a progress bar, and the matmul peak.

Only JAX process 0 writes; the other processes log their (identical) loss instead.
`metrics.jsonl` holds one JSON object per logged step; a run that resumes from a checkpoint
first drops the lines logged after that checkpoint, so the file always reads as one
uninterrupted run. The workdir may be local or a gs:// URI.
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from data.build import is_remote


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
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._progress = None
        if not self.enabled:
            return
        truncate_metrics(self.path, start_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=str(workdir))
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
            # Every process computed the same replicated metrics; its log shows they agree.
            logging.info("Process %d, step %d: loss %r", jax.process_index(), step, metrics["loss"])
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        append_line(self.path, json.dumps(record) + "\n")
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


def append_line(path: epath.PathLike, line: str) -> None:
    """Appends `line` to a text file; cloud objects can't be appended to, so those are rewritten."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_text((path.read_text() if path.exists() else "") + line)
        return
    with path.open("a") as f:
        f.write(line)


def truncate_metrics(path: epath.PathLike, last_step: int) -> None:
    """Drops lines with step > last_step (logged after the checkpoint we resume from)."""
    path = epath.Path(path)
    if not path.exists():
        return
    lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def read_metrics(path: epath.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
