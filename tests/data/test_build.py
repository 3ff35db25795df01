"""`prepare` and the `python -m data.build` CLI: tokenizer plus data, idempotently."""

from __future__ import annotations

import os
import subprocess
import sys

from data import build
from data import builder as builder_lib
from data import format as fmt
from data.config import default_data_config
from data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
    """Additions and letter counts, a few dozen records."""
    c = default_data_config()
    c.tasks = {
        "addition": {"weight": 1.0, "knobs": {"digits": (1, 3)}},
        "letter_count": {"weight": 1.0, "knobs": {"length": (3, 6)}},
    }
    c.train_size, c.validation_size, c.test_size, c.corrupted_size = 24, 4, 4, 4
    c.vocab_size = 400
    return c


def files_with_mtimes(folder) -> dict[str, int]:
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_prepare_writes_tokenizer_and_data_and_is_idempotent(tmp_path, capsys):
    first = build.prepare(tiny_config(), str(tmp_path))
    printed = capsys.readouterr().out
    assert "addition" in printed and "corrupted_train" in printed
    assert os.path.isfile(tmp_path / "tokenizer.model")
    assert first.data_dir.startswith(str(tmp_path / "data"))
    assert len(builder_lib.load_split(first.data_dir, "train")) == 24
    before = files_with_mtimes(tmp_path)

    second = build.prepare(tiny_config(), str(tmp_path))
    assert files_with_mtimes(tmp_path) == before  # nothing rebuilt or rewritten
    assert second.data_dir == first.data_dir
    assert second.tokenizer.proto_bytes == first.tokenizer.proto_bytes

    changed = tiny_config()
    changed.seed = 1
    third = build.prepare(changed, str(tmp_path), verbose=False)
    assert third.data_dir != first.data_dir  # a new config never reuses stale records
    assert third.tokenizer.proto_bytes == first.tokenizer.proto_bytes  # the workdir keeps one


def test_tokenizer_keeps_markers_whole_and_round_trips_records(tmp_path):
    prepared = build.prepare(tiny_config(), str(tmp_path), verbose=False)
    tokenizer = Tokenizer.load(str(tmp_path / "tokenizer.model"))
    for marker in fmt.SPECIAL_TOKENS:
        assert len(tokenizer.encode(marker)) == 1, marker
    record = builder_lib.load_split(prepared.data_dir, "test")[0]
    text = fmt.render_dialogue(fmt.problem_to_dialogue(builder_lib.record_to_problem(record)))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_path_is_adapted_not_retrained(tmp_path):
    source = build.prepare(tiny_config(), str(tmp_path / "a"), verbose=False).tokenizer
    c = tiny_config()
    c.tokenizer_path = str(tmp_path / "a" / "tokenizer.model")
    adapted = build.prepare(c, str(tmp_path / "b"), verbose=False).tokenizer
    assert adapted.proto_bytes == source.proto_bytes  # markers present already: nothing added


def test_format_counts_has_totals():
    table = build.format_counts({"train": {"a": 2, "b": 1}, "test": {"a": 1}})
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
    assert rows["task"] == ["train", "test"]
    assert rows["b"] == ["1", "0"] and rows["total"] == ["3", "1"]


def test_cli_builds_with_overrides(tmp_path):
    args = [
        f"--workdir={tmp_path}",
        "--config.data.train_size=12",
        "--config.data.validation_size=2",
        "--config.data.test_size=2",
        "--config.data.corrupted_size=0",
        "--config.data.tokenizer_corpus_size=12",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "data.build", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / "tokenizer.model")
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:] == ["12", "2", "2"]


def test_tokenizer_splits_held_out_words_into_several_pieces(tmp_path):
    """Letter counting is only a reasoning task if the model cannot read letters off one id."""
    import numpy as np

    from data.tasks import get_task

    config = default_data_config()
    config.train_size, config.validation_size, config.test_size = 600, 8, 8
    config.corrupted_size = 0
    prepared = build.prepare(config, str(tmp_path), verbose=False)
    family = get_task("letter_count")
    rng = np.random.default_rng(0)
    words = {family.generate(rng, split="test").meta["word"] for _ in range(200)}
    multi = np.mean([len(prepared.tokenizer.pieces(word)) >= 2 for word in words])
    assert multi >= 0.8, f"only {multi:.0%} of held-out words split into several pieces"
