"""What every benchmark shares: hardware ceilings, timing, flags, tables and JSON results.

Ceilings are measured in the benchmark's own process, right before its rows, so each ratio
(MFU, fraction of the bandwidth bound) divides two numbers taken under the same load.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from train.metrics import measure_matmul_peak

PEAK_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def define_common_flags() -> None:
    """Defines --out and --quick (call once, from a script's main guard)."""
    flags.DEFINE_string("out", None, "Path of the JSON results file.", required=True)
    flags.DEFINE_bool("quick", False, "Tiny settings that run in seconds (the smoke test).")


# ----------------------------------------------------------------------------- ceilings


def matmul_peaks(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a jitted n x n jnp.dot per dtype: the MFU denominators."""
    # The same measurement the trainer divides by, so bench MFU and logged MFU agree.
    return {name: measure_matmul_peak(n, dtype, repeats) for name, dtype in PEAK_DTYPES.items()}


def copy_bandwidth(num_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s moved (read + write) by a numpy copy of `num_bytes`: the memory ceiling."""
    src = np.ones(num_bytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault every page in before timing
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2.0 * src.nbytes / best


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds."""

    times_s: tuple[float, ...]

    @property
    def best_s(self) -> float:
        """The fastest call: the least disturbed by other processes, so rates use it."""
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        """The median call."""
        return statistics.median(self.times_s)

    def to_json(self) -> dict[str, Any]:
        """Best, median and every time."""
        return {"best_s": self.best_s, "median_s": self.median_s, "times_s": list(self.times_s)}


def time_call(fn: Callable[..., Any], *args: Any, warmup: int = 1, repeats: int = 3) -> Timing:
    """Times `fn(*args)` to completion (block_until_ready) after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def time_steps(
    step_fn: Callable[..., tuple[Any, Any]],
    carry: Any,
    *args: Any,
    warmup: int = 1,
    repeats: int = 3,
) -> tuple[Timing, Any]:
    """Times `carry, _ = step_fn(carry, *args)` one call at a time; returns (timing, carry).

    For steps that donate their carry (the train state): each call feeds the next.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        carry = jax.block_until_ready(step_fn(carry, *args))[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(step_fn(carry, *args))[0]
        times.append(time.perf_counter() - start)
    return Timing(tuple(times)), carry


def time_compile(jitted: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(compiled executable, seconds to trace and compile it) for `jitted` on these arguments.

    The executable takes the non-static arguments only.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


# ----------------------------------------------------------------------------- reporting


def environment() -> dict[str, Any]:
    """What the numbers were measured on: versions, devices, cores and load."""
    device = jax.devices()[0]
    return {
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; each column is (row key, header, format spec: ".2f", "si")."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_format_cell(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_cell(value: Any, spec: str) -> str:
    """One cell; missing values print as '-', spec "si" as a number with an SI suffix."""
    if value is None:
        return "-"
    if spec == "si":
        return format_si(value)
    return format(value, spec) if spec else str(value)


def format_si(value: float) -> str:
    """A number with 3 significant digits and an SI suffix (12.3k, 4.56M, 390G)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def write_results(path: str, results: dict[str, Any]) -> None:
    """Writes `results` plus the environment as indented JSON to `path` (folders created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **results}, f, indent=2, sort_keys=True)
        f.write("\n")
