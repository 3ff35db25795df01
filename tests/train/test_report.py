"""The run report: on the tiny run through the CLI, and on hand-made RL stage files."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from matplotlib import image

from data.format import ThinkingBlock, Turn, render_assistant
from tests.conftest import run_cli
from train import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "tokenizer.model")


def copy_run(src: str, dst: str) -> str:
    """The files a report reads, without the checkpoints."""
    os.makedirs(dst)
    for name in RUN_FILES:
        shutil.copy(os.path.join(src, name), dst)
    return dst


def linked_images(workdir: str) -> list[str]:
    """Paths of the images report.md links to; each must exist."""
    with open(os.path.join(workdir, report.REPORT_FILE)) as f:
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read())
    return [os.path.join(workdir, link) for link in links]


def assert_valid_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_report_cli_on_the_tiny_run(tiny_run, tmp_path):
    workdir = copy_run(tiny_run, str(tmp_path / "sft"))
    proc = run_cli("train.report", f"--workdir={workdir}", timeout=300)
    assert proc.stdout.strip() == os.path.join(workdir, "report.md")
    with open(proc.stdout.strip()) as f:
        text = f.read()
    for heading in ("Training curves", "Accuracy per task", "Thought length", "Sampled dialogues"):
        assert f"### {heading}" in text
    assert "Only 4 sampled responses" in text  # the tiny run shows 4: too few, and it says so
    images = linked_images(workdir)
    names = {os.path.basename(p) for p in images}
    assert {"sft_losses.png", "sft_per_task.png", "sft_thoughts.png"} <= names
    for path in images:
        assert_valid_png(path)


def worked_response(correct: bool) -> str:
    block = ThinkingBlock("How to add 2 and 3", ("2+3+0=5, write 5, carry 0", "2+3=5"), "Add.")
    return render_assistant(Turn("assistant", f"Answer: {5 if correct else 6}", (block,)))


def write_rl_stage(workdir: str) -> None:
    """Files an RL run and its search evaluation could write."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(1, 6):
            record = {
                "step": step,
                "loss": 1.0 / step,
                "reward_mean": 0.1 * step,
                "kl": 0.01 * step,
            }
            f.write(json.dumps({**record, "accuracy": 0.2 * step, "bad": float("nan")}) + "\n")
    samples = [
        {"task": "addition", "prompt": "What is 2 + 3?", "expected": "5", "correct": float(ok)}
        | {"response": worked_response(ok)}
        for ok in (True, False, True)
    ]
    result = {
        "step": 5,
        "accuracy": 0.5,
        "per_task": {"addition": {"accuracy": 0.5, "mean_thought_tokens": 9.0}},
        "samples": samples,
    }
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f)
    n = [1, 2, 4, 8]
    search = {
        "methods": {
            "majority_vote": {"n": n, "mean": [0.5, 0.55, 0.6, 0.62], "std": [0, 0.02, 0.01, 0]},
            "oracle_pass@n": {"n": n, "mean": [0.5, 0.7, 0.8, 0.9], "std": [0, 0, 0, 0]},
        },
        "beam_search": [{"beam_width": 2, "num_candidates": 4, "accuracy": 0.7, "equivalent_n": 3}],
    }
    with open(os.path.join(workdir, "search_eval.json"), "w") as f:
        json.dump(search, f)


def test_gathered_report_with_rl_metrics_search_curves_and_dialogues(tiny_run, tmp_path):
    copy_run(tiny_run, str(tmp_path / "sft"))
    rl_dir = str(tmp_path / "rl")
    write_rl_stage(rl_dir)
    os.makedirs(tmp_path / "not_a_run")
    path = report.write_report(rl_dir, gather=True)
    with open(path) as f:
        text = f.read()
    assert text.index("## rl") < text.index("## sft") and "## not_a_run" not in text
    names = {os.path.basename(p) for p in linked_images(rl_dir)}
    assert {"rl_losses.png", "rl_rewards.png", "rl_best_of_n.png", "sft_losses.png"} <= names
    for image_path in linked_images(rl_dir):
        assert_valid_png(image_path)
    assert "> **Thinking block 1:** How to add 2 and 3" in text
    assert "> 2+3+0=5, write 5, carry 0" in text and "> **Summary:** Add." in text
    assert "(correct; expected `5`)" in text and "(wrong; expected `5`)" in text


def test_best_of_n_curves_skip_what_they_cannot_plot():
    methods = {"a": {"n": [1, 4], "mean": [0.1, 0.2]}, "b": {"n": [1], "mean": [0.3, 0.4]}}
    assert report.best_of_n_curves({"methods": methods}) == {"a": ([1, 4], [0.1, 0.2], None)}
    assert report.best_of_n_curves({"note": "nothing here"}) == {}


def test_thought_points_count_only_thought_steps():
    count = lambda text: len(text.split())  # noqa: E731
    points = report.thought_points(
        [{"response": worked_response(True), "correct": 1.0}, {"response": "Answer: 5"}], count
    )
    assert points == [(6, True), (0, False)]  # "2+3+0=5, write 5, carry 0" and "2+3=5"


def test_a_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.main workdir"):
        report.write_report(str(tmp_path / "nope"))
