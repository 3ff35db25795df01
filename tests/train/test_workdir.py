"""Workdir files go through etils.epath, so a gs:// workdir works wherever a local one does.

The `bucket` fixture routes every epath call on gs://bucket/... to a local folder, through
epath's own test hook, while the working directory is an empty folder elsewhere. Code that
bypasses epath (a builtin `open`, `os.path`) on a gs:// path would miss those files, so these
tests fail on it. Orbax's arrays go through tensorstore, which this hook cannot reroute;
test_checkpoint_reshard saves and restores a checkpoint through an epath.Path instead.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from data.tokenizer import train_tokenizer
from model.config import get_preset
from rl import redaction_eval, search_eval
from tests.conftest import tiny_config
from train import checkpoint, evaluate, init_from, metrics, report, workdir

BUCKET = "gs://bucket"
# Every backend function epath's test hook can replace.
MODEL_CFG = get_preset("tiny", vocab_size=512, max_seq_len=512)  # as sft.py:tiny resolves it
BACKEND_FUNCTIONS = (
    "copy exists glob isdir listdir makedirs mkdir open remove rename replace rmtree stat walk"
).split()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket backed by `tmp_path/bucket`; yields the local folder."""
    root = tmp_path / "bucket"
    root.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative "gs:/bucket/..." would land here, not in root

    def local(path):
        text = os.fspath(path)
        if not text.startswith(BUCKET):
            return path
        return os.path.join(root, text.removeprefix(BUCKET).lstrip("/"))

    def reroute(fn, path, *args, **kwargs):
        args = [local(a) if isinstance(a, str | os.PathLike) else a for a in args]
        return fn(local(path), *args, **kwargs)

    with epath_testing.mock_epath(**dict.fromkeys(BACKEND_FUNCTIONS, reroute)):
        yield root
    assert not os.listdir(elsewhere), "something wrote a gs:// path without epath"


def tiny_tokenizer():
    """A small tokenizer trained in memory."""
    return train_tokenizer([f"{a} + {b} = {a + b}" for a in range(30) for b in range(7)], 400)


def write_run(run: str, *, tokenizer=None, checkpoints: bool = False) -> None:
    """A run's config.json (and tokenizer.model, an empty checkpoints/) at `run`."""
    epath.Path(run).mkdir(parents=True, exist_ok=True)
    workdir.write_config(run, workdir.resolved_config(tiny_config(), MODEL_CFG))
    if tokenizer is not None:
        (epath.Path(run) / workdir.TOKENIZER_FILE).write_bytes(tokenizer.proto_bytes)
    if checkpoints:
        (epath.Path(run) / "checkpoints").mkdir()


def test_config_metrics_and_eval_files_in_a_bucket(bucket):
    run = f"{BUCKET}/run"
    write_run(run)
    config = workdir.read_config(run)
    assert config.num_steps == tiny_config().num_steps
    assert workdir.model_config_of(config) == MODEL_CFG

    path = epath.Path(run) / "metrics.jsonl"  # gs://: appends rewrite the object
    for step in (1, 2, 3):
        metrics.append_line(path, json.dumps({"step": step}) + "\n")
    metrics.truncate_metrics(path, 2)
    assert [r["step"] for r in metrics.read_metrics(f"{run}/metrics.jsonl")] == [1, 2]

    evaluate.write_eval(run, {"accuracy": 0.5}, step=2)
    assert json.loads((bucket / "run" / "eval.json").read_text()) == {"step": 2, "accuracy": 0.5}
    assert sorted(os.listdir(bucket / "run")) == ["config.json", "eval.json", "metrics.jsonl"]
    assert workdir.absolute(run) == epath.Path(run)
    assert checkpoint.checkpoint_dir(run) == epath.Path(f"{run}/checkpoints")
    assert checkpoint.latest_step(run) is None


def test_init_from_a_bucket_workdir(bucket):
    tokenizer = tiny_tokenizer()
    sft, rl = f"{BUCKET}/sft", f"{BUCKET}/rl"
    write_run(sft, tokenizer=tokenizer, checkpoints=True)
    epath.Path(rl).mkdir()  # as train.loop.run does before anything else

    source = init_from.find_source(sft)
    assert source == init_from.InitSource("workdir", sft)
    init_from.prepare_tokenizer(source, rl)
    assert (bucket / "rl" / "tokenizer.model").read_bytes() == tokenizer.proto_bytes
    model_cfg = init_from.source_model_config(source, tiny_config().model, tokenizer.vocab_size)
    assert model_cfg == MODEL_CFG

    with pytest.raises(FileNotFoundError, match="neither a train.main workdir"):
        init_from.find_source(f"{BUCKET}/missing")
    hf = epath.Path(f"{BUCKET}/hf")
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="copy it to a local folder"):
        init_from.find_source(os.fspath(hf))


def test_gathered_report_in_a_bucket(bucket):
    tokenizer = tiny_tokenizer()
    for name in ("sft", "rl"):
        run = f"{BUCKET}/{name}"
        write_run(run, tokenizer=tokenizer)
        for step in (1, 2, 3):
            record = {"step": step, "loss": 2.0 / step, "rollout/reward": 0.1 * step}
            metrics.append_line(f"{run}/metrics.jsonl", json.dumps(record) + "\n")
        per_task = {"addition": {"accuracy": 0.5, "well_formed": 1.0, "mean_thought_tokens": 4}}
        evaluate.write_eval(run, {"accuracy": 0.5, "per_task": per_task}, step=3)

    path = report.write_report(f"{BUCKET}/rl", gather=True)
    assert path == f"{BUCKET}/rl/report.md"
    text = (bucket / "rl" / "report.md").read_text()
    assert "## rl" in text and "## sft" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "report/sft_losses.png" in links and "report/rl_rewards.png" in links
    for link in links:
        assert (bucket / "rl" / link).read_bytes().startswith(b"\x89PNG"), link


def test_search_and_redaction_results_in_a_bucket(bucket, monkeypatch):
    result = {
        "methods": {"majority_vote": {"n": [1, 2], "mean": [0.5, 0.6], "std": [0.0, 0.1]}},
        "beam_search": [],
        "num_problems": 4,
        "pass@1": 0.5,
    }
    json_path, png_path = search_eval.write(result, f"{BUCKET}/rl")
    assert (json_path, png_path) == (
        f"{BUCKET}/rl/search_eval.json",
        f"{BUCKET}/rl/search_eval.png",
    )
    assert json.loads((bucket / "rl" / "search_eval.json").read_text()) == result
    assert (bucket / "rl" / "search_eval.png").read_bytes().startswith(b"\x89PNG")

    monkeypatch.setattr(redaction_eval, "markdown", lambda summary: "# Redaction\n")
    redaction_eval.write({"num_conversations": 2}, f"{BUCKET}/rl")
    assert (bucket / "rl" / redaction_eval.MARKDOWN_FILE).read_text() == "# Redaction\n"
    assert json.loads((bucket / "rl" / redaction_eval.JSON_FILE).read_text()) == {
        "num_conversations": 2
    }
