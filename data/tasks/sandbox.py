"""Running untrusted Python (model-written code) in a limited, watched subprocess.

`run_python` starts `python -I -S -B` on a fixed harness in a fresh temporary directory.
Before the user code runs, the harness sets resource limits (CPU seconds, address space,
file size, no core files, no new processes) and installs an audit hook that kills the
process on any socket use, process creation (`subprocess`, `os.system`, `fork`, `exec`,
`posix_spawn`), signal sending, `ctypes`, changing limits, or writing/deleting outside the
sandbox directory. A wall-clock timeout kills the whole process group.

Hidden tests are `(expression, expected)` pairs. The child only prints each expression's
value as JSON; the comparison with `expected` happens here, so the code under test never
sees the expected values. The caller always gets a `SandboxResult`, never an exception.

The hook is a guard against accidents and naive escapes, not a security boundary against
a determined attacker: as root, RLIMIT_NPROC does not stop fork(), so the hook is the only
guard against a child process. Run this inside a container when the code is adversarial.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

MEMORY_EXIT, BLOCKED_EXIT = 101, 102
MAX_OUTPUT_BYTES = 1 << 20

_HARNESS = r"""
import json, os, resource, sys, traceback, types

config = json.load(open(sys.argv[1]))
mb = 1024 * 1024
for limit, value in (
    (resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1)),
    (resource.RLIMIT_AS, (config["memory_mb"] * mb,) * 2),
    (resource.RLIMIT_FSIZE, (config["fsize_mb"] * mb,) * 2),
    (resource.RLIMIT_CORE, (0, 0)),
    (resource.RLIMIT_NPROC, (0, 0)),
):
    hard = resource.getrlimit(limit)[1]
    if hard != resource.RLIM_INFINITY:  # never ask for more than already allowed
        value = tuple(min(v, hard) for v in value)
    resource.setrlimit(limit, value)
code = open(config["code"]).read()
tests, nonce = config["tests"], config["nonce"]
os.chdir(config["sandbox"])


def make_hook(root, blocked_exit):
    # Everything the hook uses lives in this closure, captured before user code runs, so
    # that user code cannot reach it through module globals or patched modules.
    realpath, fsdecode, isdir = os.path.realpath, os.fsdecode, os.path.isdir
    write, exit_ = os.write, os._exit
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = frozenset({
        "subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn",
        "os.spawn", "os.kill", "os.killpg", "pty.spawn", "resource.setrlimit",
        "resource.prlimit", "sys.addaudithook", "os.chroot", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents",
    })
    prefixes = ("socket.", "ctypes.", "_winapi.", "mmap.")
    imports = frozenset({"_posixsubprocess", "_ctypes", "_multiprocessing"})
    path_events = types.MappingProxyType({  # event: (path indices, dir_fd indices)
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.link": ((0, 1), (2, 3)),
        "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)),
    })

    def block(event):
        for stream in (sys.stdout, sys.stderr):  # keep what the code printed before
            try:
                stream.flush()
            except Exception:
                pass
        write(2, ("\nBLOCKED " + event + "\n").encode())
        exit_(blocked_exit)

    def inside(path):
        if isinstance(path, int):  # a file descriptor: check the file it points to
            path = "/proc/self/fd/%d" % path
        try:
            real = realpath(fsdecode(path))
        except Exception:
            return False
        return real == root or real.startswith(root + "/")

    def hook(event, args):
        if event in blocked or event.startswith(prefixes):
            block(event)
        elif event == "import" and str(args[0]).rpartition(".")[2] in imports:
            block("import " + str(args[0]))
        elif event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            writes = bool(flags & write_flags) or any(c in str(mode or "") for c in "wax+")
            if writes and not inside(path):
                block("open")
            if not writes and isdir(path) and not inside(path):
                block("open")  # a directory fd outside would allow writes through dir_fd
        elif event in path_events:
            path_at, dir_fd_at = path_events[event]
            fds = [args[i] for i in dir_fd_at if i < len(args) and args[i] not in (None, -1)]
            paths = [args[i] for i in path_at if i < len(args)]
            if not all(inside(fd) for fd in fds) or not all(inside(p) for p in paths):
                block(event)
        elif event == "os.chdir" and not inside(args[0]):
            block(event)

    return hook


sys.addaudithook(make_hook(os.path.realpath(config["sandbox"]), config["blocked_exit"]))
main = types.ModuleType("__main__")  # `import __main__` gives user code its own module
main.__builtins__ = __builtins__
sys.modules["__main__"] = main


def run_tests():
    results = []
    for expression in tests:
        try:
            results.append(["value", json.dumps(eval(expression, main.__dict__), sort_keys=True)])
        except MemoryError:
            raise
        except BaseException as error:
            results.append(["error", type(error).__name__ + ": " + str(error)[:200]])
    return results


try:
    try:
        exec(compile(code, "main.py", "exec"), main.__dict__)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    results = run_tests()
except MemoryError:
    os.write(2, b"\nMemoryError\n")
    os._exit(config["memory_exit"])
except SystemExit as stop:
    os.write(2, ("\nSystemExit " + str(stop.code)[:200] + "\n").encode())
    os._exit(1)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(1, ("\n" + nonce + json.dumps(results) + "\n").encode())
os._exit(0)
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What happened to one sandboxed run; `ok` only if it ran cleanly and all tests passed."""

    ok: bool
    status: str  # ok | timeout | memory | cpu | blocked:<event> | error | tests_failed
    stdout: str
    stderr: str
    returncode: int | None = None
    passed: int = 0
    total: int = 0
    seconds: float = 0.0


def _read_tail(path: str) -> str:
    """The last MAX_OUTPUT_BYTES of a file, decoded leniently."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - MAX_OUTPUT_BYTES))
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _canonical(value: Any) -> str:
    """The JSON text the child would print for `value`."""
    return json.dumps(value, sort_keys=True)


def _split_results(stdout: str, nonce: str) -> tuple[str, list | None]:
    """Separates the harness's results line from the user's output."""
    head, marker, tail = stdout.rpartition("\n" + nonce)
    if not marker:
        return stdout, None
    try:
        results = json.loads(tail.strip())
    except ValueError:
        return stdout, None
    return head, results if isinstance(results, list) else None


def _status(returncode: int | None, timed_out: bool, stderr: str) -> str:
    """Names why a run that did not exit cleanly stopped."""
    if timed_out:
        return "timeout"
    if returncode == BLOCKED_EXIT and "\nBLOCKED " in stderr:
        return "blocked:" + stderr.rpartition("\nBLOCKED ")[2].split("\n", 1)[0]
    if returncode == MEMORY_EXIT or "MemoryError" in stderr[-2000:]:
        return "memory"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "cpu"  # SIGXCPU at the soft CPU limit, SIGKILL at the hard one
    return "error"


def run_python(
    code: str,
    *,
    timeout_s: float = 2.0,
    cpu_s: int = 1,
    memory_mb: int = 256,
    fsize_mb: int = 1,
    tests: Sequence[Sequence[Any]] | None = None,
) -> SandboxResult:
    """Runs untrusted `code` (then each test expression) in a sandboxed subprocess."""
    try:
        return _run(code, timeout_s, cpu_s, memory_mb, fsize_mb, tests)
    except Exception as error:  # the caller gets a result, whatever went wrong
        return SandboxResult(False, "error", "", f"sandbox failed to run: {error!r}")


def _run(
    code: str,
    timeout_s: float,
    cpu_s: int,
    memory_mb: int,
    fsize_mb: int,
    tests: Sequence[Sequence[Any]] | None,
) -> SandboxResult:
    """`run_python` without the catch-all."""
    start = time.monotonic()
    tests = [list(test) for test in tests or []]
    if not isinstance(code, str) or any(len(t) != 2 or not isinstance(t[0], str) for t in tests):
        return SandboxResult(False, "error", "", "code must be str; tests (expression, expected)")
    private = tempfile.mkdtemp(prefix="thinkax_sandbox_")
    try:
        sandbox = os.path.join(private, "work")
        os.mkdir(sandbox)
        nonce = "@@results-" + secrets.token_hex(8) + "@@"
        paths = {name: os.path.join(private, name) for name in ("code", "config", "out", "err")}
        with open(paths["code"], "w", encoding="utf-8", errors="surrogatepass") as file:
            file.write(code)
        config = {
            "sandbox": sandbox,
            "code": paths["code"],
            "tests": [expression for expression, _ in tests],  # never the expected values
            "nonce": nonce,
            "cpu_s": int(cpu_s),
            "memory_mb": int(memory_mb),
            "fsize_mb": int(fsize_mb),
            "memory_exit": MEMORY_EXIT,
            "blocked_exit": BLOCKED_EXIT,
        }
        with open(paths["config"], "w") as file:
            json.dump(config, file)
        returncode, timed_out = _spawn(paths, sandbox, timeout_s)
        stdout, results = _split_results(_read_tail(paths["out"]), nonce)
        stderr = _read_tail(paths["err"])
    finally:
        shutil.rmtree(private, ignore_errors=True)
    seconds = time.monotonic() - start
    if returncode != 0 or timed_out or results is None:
        status = _status(returncode, timed_out, stderr) if returncode != 0 or timed_out else "error"
        return SandboxResult(False, status, stdout, stderr, returncode, 0, len(tests), seconds)
    if len(results) != len(tests):
        return SandboxResult(False, "error", stdout, stderr, returncode, 0, len(tests), seconds)
    passed = sum(
        result == ["value", _canonical(expected)]
        for result, (_, expected) in zip(results, tests, strict=True)
    )
    ok = passed == len(tests)
    status = "ok" if ok else "tests_failed"
    return SandboxResult(ok, status, stdout, stderr, returncode, passed, len(tests), seconds)


def _spawn(paths: dict[str, str], sandbox: str, timeout_s: float) -> tuple[int | None, bool]:
    """Runs the harness with a wall-clock limit; returns (returncode, timed_out)."""
    command = [sys.executable, "-I", "-S", "-B", "-c", _HARNESS, paths["config"]]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    with open(paths["out"], "wb") as out, open(paths["err"], "wb") as err:
        process = subprocess.Popen(
            command,
            cwd=sandbox,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, so a kill reaches any stragglers
        )
        try:
            return process.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            return process.returncode, True
