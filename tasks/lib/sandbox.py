"""Run an untrusted candidate program against test cases, every test in its own contained subprocess.

Why: LiveCodeBench grades model-written programs by running them. A program may loop forever,
allocate without bound, fork, write or read where it should not, print gigabytes or signal its
parent; none of that may reach the harness or lose a run. Each test runs as a fresh
``python -I`` process (no environment variables but a minimal PATH/LANG, no user site, no script
directory on ``sys.path``) in a fresh temporary directory that is deleted afterwards, in its own
session (the whole process group is killed at the end), with:

* a wall-time limit per test and per problem (the remaining tests of a problem over its budget
  fail), and a CPU-time limit (``RLIMIT_CPU``);
* an address-space limit (``RLIMIT_AS``), a file-size limit (``RLIMIT_FSIZE``), no core dumps (the
  child sets its limits itself before the candidate's code runs, and then may not change them);
* output read in chunks and cut at ``output_bytes`` (the process is killed past it);
* on Linux, when the harness runs as root with ``setpriv`` and ``nobody`` may run its Python: the
  program runs as ``nobody`` (it cannot write the harness's files, read root-only files or signal
  root's processes) with ``RLIMIT_NPROC`` enforced; and in a new network namespace when
  ``unshare -n`` is permitted (no network at all);
* inside the child, before the candidate's code runs, an audit hook (PEP 578) that refuses
  process creation (fork, exec, spawn, subprocess, os.system), signals to other processes,
  sockets, ``ctypes``, and opening or deleting files outside the working directory (reads of the
  Python installation stay allowed). Audit hooks are a second layer, not a security boundary
  (Python's docs say so): the OS limits above are what holds against a determined program.

What is not enforced: without root, the program runs as the harness's user (file permissions do
not protect the harness's own files; the audit hook does) and ``RLIMIT_NPROC`` counts that
user's processes (set high enough not to starve the harness); without ``unshare`` the network is
only refused by the audit hook; on macOS ``RLIMIT_AS`` is not enforced; Windows is not supported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The child's prelude: limits the candidate from inside, then runs it (stdin mode) or calls its
#: function on JSON arguments and prints the JSON result (functional mode).
RUNNER = r'''
import json, os, resource, sys
MODE, FUNC = sys.argv[1], sys.argv[2]
for name, value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE"), map(int, sys.argv[3:8])):
    if value >= 0 and hasattr(resource, name):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass
HERE = os.path.realpath(os.getcwd())
ALLOWED_READ = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                      os.path.dirname(os.__file__))} | {HERE})
BLOCKED_EVENTS = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
                  "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__",
                  "socket.connect", "socket.bind", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chroot",
                  "sys.addaudithook", "os.setuid", "os.setgid", "resource.setrlimit"}
BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_multiprocessing"}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.chmod", "os.chown", "os.mkdir",
               "os.symlink", "os.link", "os.truncate", "os.utime", "os.chdir"}
LIST_EVENTS = {"os.listdir", "os.scandir"}
code = open("solution.py", encoding="utf-8").read()
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED_MODULES:
        del sys.modules[name]

def inside(path, roots):
    try:
        real = os.path.realpath(os.fsdecode(path)) if not isinstance(path, int) else None
    except Exception:
        return False
    return real is not None and any(real == r or real.startswith(r + os.sep) for r in roots)

def hook(event, args):
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:  # an ImportError: optional users go on
        raise ImportError(f"sandbox: import {args[0]} is not allowed")
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        writing = any(c in str(args[1] or "r") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)
        if not inside(args[0], (HERE,) if writing else ALLOWED_READ):
            raise PermissionError(f"sandbox: open {args[0]!r} is not allowed")
    if event in PATH_EVENTS and args and not isinstance(args[0], int) and not inside(args[0], (HERE,)):
        raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
    if event in LIST_EVENTS and args and isinstance(args[0], (str, bytes)) and not inside(args[0], ALLOWED_READ):
        raise PermissionError(f"sandbox: {event} {args[0]!r} is not allowed")

sys.addaudithook(hook)
if MODE == "stdin":
    exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
else:
    scope = {"__name__": "solution"}
    exec(compile(code, "solution.py", "exec"), scope)
    args = [json.loads(line) for line in sys.stdin.read().split("\n") if line.strip()]
    target = scope["Solution"]() if "Solution" in scope else None
    fn = getattr(target, FUNC) if target is not None else scope[FUNC]
    print(json.dumps(fn(*args)))
'''


@dataclass(frozen=True)
class Limits:
    """Per-test wall seconds, per-problem wall seconds, memory (MiB), output bytes, processes."""

    test_timeout_s: float = 6.0
    problem_timeout_s: float = 60.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    processes: int = 256


@dataclass(frozen=True)
class TestCase:
    """One test: the program's stdin (functional: one JSON argument per line) and the expected output."""

    __test__ = False  # not a pytest class

    input: str
    output: str


@dataclass
class Verdict:
    """``status``: passed | wrong_answer | runtime_error | timeout | output_limit | problem_timeout."""

    status: str
    tests_passed: int
    tests: int
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def _net_namespace() -> bool:
    """Whether ``unshare -n`` can run a command here (a new, empty network namespace)."""
    tool = shutil.which("unshare")
    if not tool or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([tool, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def _drop_to_nobody() -> bool:
    """Root on Linux with ``setpriv``, and ``nobody`` can run this Python (not so when it lives under /root)."""
    tool = shutil.which("setpriv")
    if not (sys.platform.startswith("linux") and os.geteuid() == 0 and tool):
        return False
    try:
        return subprocess.run([tool, *NOBODY, sys.executable, "-I", "-c", "pass"], capture_output=True,
                              timeout=20, cwd="/").returncode == 0  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False


NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")


def _rlimits(limits: Limits, cpu_s: int) -> list[str]:
    """The runner's limits, set by the child itself before the candidate runs (no preexec_fn: the
    grader runs in threads): address space, CPU seconds, file size, processes (only as nobody:
    for another user it would count the harness's own processes), core dumps."""
    nproc = limits.processes if _drop_to_nobody() else -1
    return [str(v) for v in (limits.memory_mb * 2**20, cpu_s, limits.output_bytes, nproc, 0)]


def run_program(code: str, stdin: str, mode: str, func_name: str, limits: Limits, timeout_s: float) -> tuple[str, str, str]:
    """Run ``code`` once: ``(status, stdout, stderr_tail)``, status ok | runtime_error | timeout | output_limit."""
    work = Path(tempfile.mkdtemp(prefix="rb-sandbox-"))
    try:
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "runner.py").write_text(RUNNER, encoding="utf-8")
        if _drop_to_nobody():
            for p in (work, work / "solution.py", work / "runner.py"):
                os.chown(p, 65534, 65534)
        cmd = [sys.executable, "-I", "runner.py", mode, func_name or "-", *_rlimits(limits, int(timeout_s) + 1)]
        if _drop_to_nobody():
            cmd = [shutil.which("setpriv") or "setpriv", *NOBODY, *cmd]
        if _net_namespace():
            cmd = [shutil.which("unshare") or "unshare", "-n", *cmd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            out, err, status = _communicate(proc, stdin.encode(), limits.output_bytes, timeout_s)
        finally:
            _kill_group(proc)
        if status == "ok" and proc.returncode != 0:
            status = "runtime_error"
        return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")[-400:]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _communicate(proc: subprocess.Popen, data: bytes, cap: int, timeout_s: float) -> tuple[bytes, bytes, str]:
    """Feed stdin, read stdout/stderr with a byte cap and a wall deadline (threads: no select on pipes needed)."""
    import threading

    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    size = {"out": 0, "err": 0}
    over = threading.Event()

    def pump(name: str, stream: Any) -> None:
        while True:
            block = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not block:
                return
            if size[name] < cap:
                chunks[name].append(block[: cap - size[name]])
            size[name] += len(block)
            if size[name] > cap and name == "out":
                over.set()
                return

    def feed() -> None:
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except OSError:
            pass

    threads = [threading.Thread(target=pump, args=("out", proc.stdout), daemon=True),
               threading.Thread(target=pump, args=("err", proc.stderr), daemon=True),
               threading.Thread(target=feed, daemon=True)]  # fmt: skip
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    status = "ok"
    while proc.poll() is None:
        if over.is_set():
            status = "output_limit"
            break
        if time.monotonic() > deadline:
            status = "timeout"
            break
        time.sleep(0.005)
    if status != "ok":
        _kill_group(proc)
    proc.wait()
    for t in threads[:2]:
        t.join(timeout=2)
    if over.is_set():
        status = "output_limit"
    return b"".join(chunks["out"]), b"".join(chunks["err"]), status


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


# ---- comparison, as LiveCodeBench compares --------------------------------------------------------------


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.strip().split("\n")]
    return lines


def _number(token: str) -> Decimal | None:
    try:
        return Decimal(token)
    except (InvalidOperation, ValueError):
        return None


def stdout_matches(got: str, expected: str) -> bool:
    """Line by line after stripping; a line whose text differs still matches when its whitespace-split
    tokens are numbers of equal value (``1.0`` = ``1``)."""
    a, b = _lines(got), _lines(expected)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        xs, ys = x.split(), y.split()
        if len(xs) != len(ys):
            return False
        for s, t in zip(xs, ys):
            if s == t:
                continue
            ns, nt = _number(s), _number(t)
            if ns is None or nt is None or ns != nt:
                return False
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def functional_matches(got: str, expected: str) -> bool:
    """The printed JSON result equals the expected JSON value (tuples as lists)."""
    try:
        return _plain(json.loads(got.strip().splitlines()[-1])) == _plain(json.loads(expected))
    except (json.JSONDecodeError, IndexError):
        return False


def grade(code: str, tests: list[TestCase], mode: str, func_name: str = "", limits: Limits = Limits()) -> Verdict:
    """Run every test in order (stop at the first failure, as LiveCodeBench does); ``mode``: stdin | functional."""
    if mode not in ("stdin", "functional"):
        raise ValueError(f"mode must be stdin or functional, got {mode!r}")
    started = time.monotonic()
    for i, test in enumerate(tests):
        left = limits.problem_timeout_s - (time.monotonic() - started)
        if left <= 0:
            return Verdict("problem_timeout", i, len(tests), f"over {limits.problem_timeout_s:g} s for the problem")
        status, out, err = run_program(code, test.input, mode, func_name, limits, min(limits.test_timeout_s, left))
        if status != "ok":
            return Verdict(status, i, len(tests), err.strip().splitlines()[-1] if err.strip() else "")
        ok = stdout_matches(out, test.output) if mode == "stdin" else functional_matches(out, test.output)
        if not ok:
            return Verdict("wrong_answer", i, len(tests), f"test {i}")
    return Verdict("passed", len(tests), len(tests))


__all__ = ["Limits", "TestCase", "Verdict", "functional_matches", "grade", "run_program", "stdout_matches"]
