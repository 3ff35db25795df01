"""Tests for the sandbox: each kind of escape fails with its status and writes nothing outside."""

from __future__ import annotations

import pathlib

import pytest

from data.tasks.sandbox import run_python

REPO = pathlib.Path(__file__).resolve().parents[2]
DOUBLE = "def double(x):\n    return 2 * x\n"


def test_clean_run_and_hidden_tests():
    result = run_python("print('hello')")
    assert result.ok and result.status == "ok" and result.stdout == "hello\n"
    result = run_python(
        DOUBLE + "print('side output')", tests=[("double(3)", 6), ("double(-1)", -2)]
    )
    assert result.ok and result.passed == result.total == 2
    assert result.stdout == "side output\n"  # the harness's results line is removed
    wrong = run_python(DOUBLE, tests=[("double(3)", 6), ("double(2)", 5), ("double('a')", "aa")])
    assert not wrong.ok and wrong.status == "tests_failed" and wrong.passed == 2
    strict = run_python("def one():\n    return True\n", tests=[("one()", 1)])
    assert strict.status == "tests_failed"  # True is not 1
    crash = run_python(DOUBLE, tests=[("double(None)", 0), ("missing()", 0)])
    assert crash.status == "tests_failed" and crash.passed == 0


def test_the_child_never_sees_expected_values():
    code = "import sys\nprint(open(sys.argv[1]).read())\ndef f():\n    return 1\n"
    result = run_python(code, tests=[("f()", "SECRET-EXPECTED-VALUE")])
    assert result.status == "tests_failed"
    assert "f()" in result.stdout and "SECRET-EXPECTED-VALUE" not in result.stdout


def test_errors_and_exits():
    assert run_python("1 / 0").status == "error"
    assert "ZeroDivisionError" in run_python("1 / 0").stderr
    assert run_python("def (:").status == "error"
    assert run_python("import sys\nsys.exit(3)").status == "error"
    assert run_python(DOUBLE + "import sys\nsys.exit(0)", tests=[("double(1)", 2)]).ok
    assert run_python(None).status == "error"
    assert run_python("x = 1", tests=[("only one item",)]).status == "error"


def test_infinite_loop_hits_the_cpu_limit():
    result = run_python("while True:\n    pass", timeout_s=20, cpu_s=1)
    assert result.status == "cpu" and result.seconds < 10


def test_sleeping_hits_the_wall_clock_limit():
    result = run_python("import time\ntime.sleep(30)", timeout_s=1)
    assert result.status == "timeout" and result.seconds < 5


@pytest.mark.parametrize(
    "code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"]
)
def test_memory_bombs_hit_the_memory_limit(code):
    assert run_python(code, memory_mb=128, timeout_s=10).status == "memory"


def test_endless_output_is_cut_by_the_file_size_limit():
    result = run_python("while True:\n    print('x' * 1000)", timeout_s=10)
    assert result.status == "error" and len(result.stdout) <= 1 << 20


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("import os\nos.fork()", "blocked:os.fork"),
        ("import os\nos.execv('/bin/true', ['true'])", "blocked:os.exec"),
        ("import os\nos.posix_spawn('/bin/true', ['true'], {})", "blocked:os.posix_spawn"),
        ("import os\nos.kill(os.getppid(), 9)", "blocked:os.kill"),
        ("import ctypes", "blocked:import _ctypes"),
        ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (9, 9))", "blocked:resource"),
        (
            "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))",
            "blocked:socket.__new__",
        ),
    ],
)
def test_processes_sockets_and_limits_are_blocked(code, status):
    assert run_python(code).status.startswith(status)


def test_subprocess_and_os_system_are_blocked(tmp_path):
    marker = tmp_path / "ran"
    result = run_python(f"import subprocess\nsubprocess.run(['touch', '{marker}'])")
    assert result.status.startswith("blocked:")
    result = run_python(f"import os\nos.system('touch {marker}')")
    assert result.status == "blocked:os.system"
    assert not marker.exists()


def test_writes_outside_the_sandbox_are_blocked(tmp_path):
    outside = tmp_path / "escaped.txt"
    in_repo = REPO / "sandbox_escape_probe.txt"
    attempts = [
        f"open({str(outside)!r}, 'w').write('x')",
        f"open({str(in_repo)!r}, 'a').write('x')",
        f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')",
        f"import os\nos.symlink({str(outside)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)",
        "import os\nos.chdir('..')\nopen('escaped.txt', 'w').write('x')",
    ]
    for code in attempts:
        assert run_python(code).status.startswith("blocked:"), code
    (tmp_path / "victim.txt").write_text("keep me")
    for code in [
        f"import os\nos.remove({str(tmp_path / 'victim.txt')!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(tmp_path / 'victim.txt')!r}, 'stolen.txt')",
    ]:
        assert run_python(code).status.startswith("blocked:"), code
    assert not outside.exists() and not in_repo.exists()
    assert (tmp_path / "victim.txt").read_text() == "keep me"


def test_writing_inside_the_sandbox_is_allowed():
    code = "open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())"
    result = run_python(code)
    assert result.ok and result.stdout == "kept\n"
    assert run_python("import json, math, re, collections, itertools\nprint(math.pi > 3)").ok
    code = (
        "import os, shutil\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nshutil.rmtree('a')"
    )
    assert run_python(code + "\nprint(os.listdir('.'))").stdout == "[]\n"


def test_user_code_cannot_reach_or_patch_the_guard(tmp_path):
    outside = tmp_path / "escaped.txt"
    result = run_python(
        "import __main__, os\nprint(hasattr(__main__, 'make_hook'))\nos.system('true')"
    )
    assert result.status == "blocked:os.system" and result.stdout == "False\n"
    assert run_python("import gc\ngc.get_objects()").status == "blocked:gc.get_objects"
    patched = f"import os\nos.path.realpath = lambda p: os.getcwd()\nopen({str(outside)!r}, 'w')"
    assert run_python(patched).status == "blocked:open"
    assert not outside.exists()
