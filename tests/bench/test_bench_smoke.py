"""The benchmark scripts at --quick: they run, print their table and write consistent JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bench.decode import compute_tokens_per_s, decode_bytes_per_step, recompute_sample
from bench.pipeline import count_examples
from bench.train_step import synthetic_batch
from data.pipeline import BATCH_FEATURES
from model.config import get_preset
from model.sampler import sample
from tests.conftest import build_once, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("train_step", "decode", "pipeline")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """{script: (stdout, results JSON)}, once per test run (tests/conftest.py:build_once)."""
    return build_once(tmp_path_factory, "bench_quick_runs", run_quick)


def run_quick(out_dir) -> dict:
    """Runs the three scripts at once (compiling is most of it): {script: (stdout, JSON)}."""
    env = subprocess_env()
    procs = {}
    for name in SCRIPTS:
        cmd = [sys.executable, "-m", f"bench.{name}", "--quick", f"--out={out_dir}/{name}.json"]
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"bench.{name} failed:\n{stderr[-4000:]}"
        with open(out_dir / f"{name}.json") as f:
            runs[name] = (stdout, json.load(f))
    return runs


def test_every_result_records_its_environment(quick_runs):
    for _, results in quick_runs.values():
        env = results["environment"]
        assert env["backend"] == "cpu" and env["num_devices"] == 1
        assert set(env) >= {"jax", "cpu_count", "load_average", "time_utc"}


def test_train_step_rows_and_mfu(quick_runs):
    stdout, results = quick_runs["train_step"]
    assert "step MFU" in stdout and "tiny no_scan" in stdout
    peaks = results["peaks_flops"]
    assert set(peaks) == {"float32", "bfloat16"} and min(peaks.values()) > 0
    rows = {row["label"]: row for row in results["rows"]}
    assert set(rows) == {"tiny", "tiny no_scan"}
    assert set(rows["tiny"]["passes"]) == {"forward", "forward_backward", "train_step"}
    assert set(rows["tiny no_scan"]["passes"]) == {"train_step"}
    assert rows["tiny no_scan"]["model"]["scan_layers"] is False
    for row in rows.values():
        assert row["tokens_per_batch"] == 8 * 64
        for name, result in row["passes"].items():
            assert result["tokens_per_s"] == pytest.approx(8 * 64 / result["best_s"])
            share = 1 / 3 if name == "forward" else 1.0
            flops = result["tokens_per_s"] * row["flops_per_token"] * share
            for dtype, peak in peaks.items():
                assert result["mfu"][dtype] == pytest.approx(flops / peak)
            assert result["compile_s"] > 0 and result["best_s"] <= result["median_s"]


def test_decode_cases_and_summary(quick_runs):
    stdout, results = quick_runs["decode"]
    assert "cache speedup at 8 new tokens" in stdout
    cases = results["cases"]
    assert [(c["batch"], c["prompt_len"], c["new_tokens"]) for c in cases] == [
        (1, 16, 8),
        (4, 16, 8),
    ]
    for case in cases:
        cache, recompute = case["cache"]["tokens_per_s"], case["recompute"]["tokens_per_s"]
        assert case["cache_speedup"] == pytest.approx(cache / recompute)
        assert case["fraction_of_bound"] == pytest.approx(cache / case["bound"]["tokens_per_s"])
        assert case["recompute"]["padded_len"] == 24
        assert case["bound"]["copy_bandwidth_bytes_per_s"] > 1e8
        assert case["compute"]["matmul_peak_flops"] > 1e8
        roofline = min(case["bound"]["tokens_per_s"], case["compute"]["tokens_per_s"])
        assert case["fraction_of_roofline"] == pytest.approx(cache / roofline)
    summary = results["summary"]
    assert summary["batch"] == 4 and summary["new_tokens"] == 8
    assert set(summary["cache_speedup"]) == {"batch=1,prompt=16", "batch=4,prompt=16"}
    assert set(summary["fraction_of_roofline"]) == {"prompt=16,new=8"}


def test_pipeline_headroom(quick_runs):
    stdout, results = quick_runs["pipeline"]
    assert "headroom" in stdout
    pipeline, step = results["pipeline"], results["train_step"]
    assert results["batch_shape"] == {"seq_len": 256, "batch_size": 8}
    # One untimed call, then two rounds, of two batches each.
    assert pipeline["batches"] == 6 and pipeline["tokens"] == 6 * 8 * 256
    assert pipeline["tokens_per_s"] == pytest.approx(2 * 8 * 256 / pipeline["best_s"])
    assert 0 < pipeline["non_pad_tokens"] <= pipeline["tokens"]
    assert pipeline["examples"] >= 3
    assert step["source"] == "measured" and step["tokens_per_s"] > 0
    assert results["headroom"] == pytest.approx(pipeline["tokens_per_s"] / step["tokens_per_s"])


def test_recompute_baseline_matches_the_cached_sampler(tiny_cfg, tiny_params):
    """Greedy decoding without a cache picks the very tokens the KV-cache sampler picks."""
    B, P, T = 2, 16, 6
    prompts_BxP = np.random.default_rng(0).integers(1, tiny_cfg.vocab_size, (B, P), np.int32)
    rng = jax.random.PRNGKey(0)
    cached = sample(
        tiny_params,
        tiny_cfg,
        (prompts_BxP, np.full((B,), P, np.int32)),
        rng=rng,
        max_new_tokens=T,
        stop_tokens=(),
        greedy=True,
    ).tokens_BxNxT[:, 0]
    padded_BxS = np.zeros((B, P + T), np.int32)
    padded_BxS[:, :P] = prompts_BxP
    full = recompute_sample(tiny_params, tiny_cfg, padded_BxS, P, rng, num_steps=T, greedy=True)
    np.testing.assert_array_equal(np.asarray(full)[:, :P], prompts_BxP)
    np.testing.assert_array_equal(np.asarray(full)[:, P:], np.asarray(cached))


def test_decode_bytes_count_weights_once_and_every_cached_token():
    cfg = get_preset("base")  # untied: the embedding table is gathered, not read whole
    weights = 4 * (cfg.num_params() - cfg.vocab_size * cfg.d_model)
    kv_per_token = 2 * 8 * 8 * 64 * 4  # k and v, 8 layers, 8 kv heads, head dim 64, float32
    assert decode_bytes_per_step(cfg, 1, 0) == weights
    assert decode_bytes_per_step(cfg, 4, 100) == weights + 4 * 100 * kv_per_token
    tied = get_preset("small")
    assert decode_bytes_per_step(tied, 1, 0) == 4 * tied.num_params()


def test_decode_compute_bound_is_the_forward_flops_at_the_peak():
    cfg = get_preset("small")
    context = 16 + (7 + 1) / 2
    matmul_weights = cfg.num_layers * (cfg.layer_params() - 2 * cfg.d_model)
    matmul_weights += cfg.d_model * cfg.vocab_size
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    flops = 2 * matmul_weights + attention
    assert compute_tokens_per_s(cfg, 16, 7, 1e9) == pytest.approx(1e9 / flops)


def test_count_examples_counts_segment_starts():
    segment_ids = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert count_examples(segment_ids) == 5
    assert count_examples(segment_ids[:1]) == 2


def test_synthetic_batch_has_the_pipeline_schema():
    batch = synthetic_batch(2, 10, vocab_size=50)
    assert set(batch) == set(BATCH_FEATURES)
    assert all(x.shape == (2, 10) for x in batch.values())
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 3, 3, 4])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    assert batch["loss_mask"].min() == 1.0 and 0 < batch["inputs"].min()
