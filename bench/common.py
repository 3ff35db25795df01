"""What every benchmark shares: hardware ceilings, timing, flags, tables and JSON results.

Ceilings (matmul peaks, copy bandwidth) are timed in the benchmark's own process, round-robin
with the calls they are the ceilings of, so each ratio (MFU, fraction of the bandwidth bound)
divides two numbers taken under the same load.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

PEAK_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def define_common_flags() -> None:
    """Defines --out and --quick (call once, from a script's main guard)."""
    flags.DEFINE_string("out", None, "Path of the JSON results file.", required=True)
    flags.DEFINE_bool("quick", False, "Tiny settings that run in seconds (the smoke test).")


# ----------------------------------------------------------------------------- ceilings


def matmul_call(n: int, dtype: str) -> tuple[Callable[[], Any], float]:
    """(a no-argument call of a compiled n x n jnp.dot in `dtype`, the FLOPs of one call)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), PEAK_DTYPES[dtype])
    b = jax.random.normal(k2, (n, n), PEAK_DTYPES[dtype])
    # The trainer's MFU denominator (train.metrics.measure_matmul_peak) times this same dot.
    matmul = jax.jit(jnp.dot).lower(a, b).compile()
    return functools.partial(matmul, a, b), 2.0 * n**3


def copy_call(num_bytes: int) -> tuple[Callable[[], Any], float]:
    """(a no-argument copy of `num_bytes` in the default device's memory, the bytes one call
    moves: read + write). On a CPU a numpy copy; on an accelerator a jitted device copy."""
    if jax.default_backend() == "cpu":
        src = np.ones(num_bytes // 8, np.float64)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # fault every page in before timing
        return functools.partial(np.copyto, dst, src), 2.0 * src.nbytes
    src = jnp.ones(num_bytes // 4, jnp.float32)
    copy = jax.jit(lambda x: x * 1.0).lower(src).compile()
    return functools.partial(copy, src), 2.0 * src.nbytes


def ceiling_calls(*, peak_n: int = 0, copy_bytes: int = 0) -> dict[str, tuple[Callable, float]]:
    """{"peak_<dtype>" for each matmul dtype if peak_n, "copy" if copy_bytes: (call, work)}."""
    calls = {}
    if peak_n:
        calls.update({f"peak_{dtype}": matmul_call(peak_n, dtype) for dtype in PEAK_DTYPES})
    if copy_bytes:
        calls["copy"] = copy_call(copy_bytes)
    return calls


def ceiling_rates(
    timings: Mapping[str, Timing], ceilings: Mapping[str, tuple[Callable, float]]
) -> dict[str, float]:
    """Work per second of each ceiling call (FLOP/s, bytes/s), from its fastest round."""
    return {name: work / timings[name].best_s for name, (_, work) in ceilings.items()}


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


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 3
) -> dict[str, Timing]:
    """Times every no-argument call once per round, round-robin, each to completion.

    Load that drifts during the run then hits every call alike, so ratios of their times
    hold up on a shared machine. `warmup` untimed rounds go first.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in times.items()}


class Stepper:
    """A donating step `carry, out = step_fn(carry, *args)` as a no-argument call.

    Each call feeds the previous call's carry (a train state whose buffers were donated)
    and returns (carry, out), so blocking on it waits for the whole step.
    """

    def __init__(self, step_fn: Callable[..., tuple[Any, Any]], carry: Any, *args: Any):
        self.step_fn, self.carry, self.args = step_fn, carry, args

    def __call__(self) -> tuple[Any, Any]:
        self.carry, out = self.step_fn(self.carry, *self.args)
        return self.carry, out


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
