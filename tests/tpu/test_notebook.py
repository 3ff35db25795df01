"""The Colab demo notebook runs top to bottom on CPU, at its tiny size, in a real kernel."""

from __future__ import annotations

import os

import pytest

nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient)")
nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat)")

from tests.conftest import OPTIMIZATION_FLAG  # noqa: E402
from train.objectives import OBJECTIVES  # noqa: E402

NOTEBOOK = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "tpu",
    "colab_demo.ipynb",
)


def cell_text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_colab_demo_runs_on_cpu(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment: one plain CPU device, runs under tmp_path.
    monkeypatch.setenv("XLA_FLAGS", OPTIMIZATION_FLAG)  # the tests' subprocess_env
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("THINKAX_DEMO_DIR", str(tmp_path / "demo"))
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    install, detect, sft, sample, grpo, plot = (cell_text(cell) for cell in code)
    assert "thinkax importable: True" in install
    assert "cpu device(s)" in detect and "size: tiny" in detect
    assert "logged steps" in sft and "eval at step" in sft
    assert any("image/png" in out.get("data", {}) for out in code[2].outputs)  # the loss curve
    assert sample.strip(), "rl.sample printed nothing"
    assert os.path.exists(tmp_path / "demo" / "sft" / "checkpoints")
    if "grpo" in OBJECTIVES:
        assert "eval at step" in grpo and "rollout/reward" in plot
        assert any("image/png" in out.get("data", {}) for out in code[5].outputs)
    else:
        assert "skipped" in grpo
