"""LiveCodeBench: the sandboxed grader (verdicts, hostile programs contained), the loaders (hub
through a local fake, compressed private tests, the date window; local JSONL; malformed rows), the
prompt and extraction, and one end-to-end run on tiny_random."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
from conftest import run_cli

from retrobench.tasks.lib import livecodebench as lcb
from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample
from retrobench.tasks.reasoning import ReasoningTask
from retrobench.tasks.lib.sandbox import Limits, TestCase, grade

ADD = [TestCase("1 2\n", "3\n"), TestCase("10 -4\n", "6\n"), TestCase("0 0\n", "0")]
PAIR = [TestCase("[1, 2, 3]\n2", "[3, 4]"), TestCase("[]\n1", "[]")]  # functional: one JSON value per line
FAST = Limits(test_timeout_s=2.0, problem_timeout_s=10.0, memory_mb=256)


# ---- verdicts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)", "passed"),
        ("a, b = map(int, input().split())\nprint(a - b)", "wrong_answer"),
        ("a, b = map(int, input().split())\nprint(a / 0)", "runtime_error"),
        ("while True:\n    pass", "timeout"),
        ("x = bytearray(2**40)", "runtime_error"),  # MemoryError under RLIMIT_AS
        ("x = []\nwhile True:\n    x.append(bytearray(2**24))", "runtime_error"),
    ],
    ids=["correct", "wrong", "error", "timeout", "memory-at-once", "memory-growing"],
)
def test_stdin_verdicts(code: str, status: str) -> None:
    verdict = grade(code, ADD, "stdin", limits=FAST)
    assert verdict.status == status, verdict
    assert verdict.tests == 3 and verdict.tests_passed == (3 if status == "passed" else 0)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("class Solution:\n    def pairs(self, xs, k):\n        return [x + k for x in xs[:2]] if xs else []", "passed"),
        ("class Solution:\n    def pairs(self, xs, k):\n        return (xs[0] + k, xs[1] + k) if xs else ()", "passed"),
        ("class Solution:\n    def pairs(self, xs, k):\n        return xs", "wrong_answer"),
        ("class Solution:\n    def pairs(self, xs, k):\n        return xs[5]", "runtime_error"),
        ("class Solution:\n    def pairs(self, xs, k):\n        while True: pass", "timeout"),
        ("class Solution:\n    def other(self, xs, k):\n        return xs", "runtime_error"),
    ],
    ids=["correct", "tuple-as-list", "wrong", "error", "timeout", "no-such-method"],
)
def test_functional_verdicts(code: str, status: str) -> None:
    assert grade(code, PAIR, "functional", "pairs", limits=FAST).status == status


def test_output_comparison_as_the_benchmark_compares() -> None:
    from retrobench.tasks.lib.sandbox import stdout_matches

    assert stdout_matches("3  \n4\n\n", "3\n4")  # trailing spaces and blank lines
    assert stdout_matches("1.0 2.50\n", "1 2.5")  # numbers of equal value
    assert not stdout_matches("1.0001\n", "1")
    assert not stdout_matches("3\n4\n5", "3\n4")
    assert not stdout_matches("YES", "yes")


def test_the_problem_budget_stops_the_remaining_tests() -> None:
    slow = "import time\ntime.sleep(0.6)\na, b = map(int, input().split())\nprint(a + b)"
    verdict = grade(slow, ADD * 3, "stdin", limits=Limits(test_timeout_s=2.0, problem_timeout_s=1.5))
    assert verdict.status in ("problem_timeout", "timeout") and verdict.tests_passed < 9


# ---- hostile programs ---------------------------------------------------------------------------------------


def _secret(tmp_path: Path) -> Path:
    path = tmp_path / "harness-secret.txt"
    path.write_text("the harness's own data")
    return path


HOSTILE = {
    "loops-forever": "while True:\n    pass",
    "allocates-without-bound": "x = []\nwhile True:\n    x.append(' ' * 2**24)",
    "forks-repeatedly": "import os\nwhile True:\n    os.fork()",
    "forks-through-multiprocessing": "import multiprocessing as m\n[m.Process(target=print).start() for _ in range(50)]",
    "spawns-a-shell": "import subprocess\nsubprocess.run('echo pwned > /tmp/rb-pwned', shell=True)",
    "writes-outside": "open({target!r}, 'w').write('overwritten')",
    "deletes-outside": "import os\nos.remove({target!r})",
    "reads-the-harness": "print(open({target!r}).read())",
    "lists-the-harness": "import os\nprint(os.listdir({folder!r}))",
    "prints-gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "kills-its-parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kills-its-group": "import os, signal\nos.killpg(0, signal.SIGKILL)",
    "opens-a-socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
    "uses-ctypes": "import ctypes\nctypes.CDLL(None).kill(os.getppid(), 9)",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_fail_and_are_contained(tmp_path: Path, name: str) -> None:
    secret = _secret(tmp_path)
    code = HOSTILE[name].format(target=str(secret), folder=str(tmp_path))
    verdict = grade(code, [TestCase("", "never printed")], "stdin", limits=FAST)
    assert not verdict.passed, verdict
    assert secret.read_text() == "the harness's own data"  # not overwritten, not deleted
    assert not Path("/tmp/rb-pwned").exists()
    refused = {"forks-repeatedly": "os.fork", "spawns-a-shell": "_posixsubprocess", "kills-its-parent": "os.kill",
               "kills-its-group": "os.killpg", "opens-a-socket": "socket", "uses-ctypes": "ctypes",
               "writes-outside": "open", "deletes-outside": "os.remove"}  # fmt: skip
    if name in refused:  # the refusal itself, not only a failed test
        assert verdict.status == "runtime_error" and "sandbox" in verdict.detail and refused[name] in verdict.detail
    if name == "prints-gigabytes":
        assert verdict.status == "output_limit"
    if name in ("reads-the-harness", "lists-the-harness"):
        assert verdict.status == "runtime_error" and "sandbox" in verdict.detail


def test_a_hostile_program_reading_the_harness_never_gets_its_output_through(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    verdict = grade(f"print(open({str(secret)!r}).read())", [TestCase("", "the harness's own data")], "stdin",
                    limits=FAST)  # fmt: skip
    assert verdict.status == "runtime_error"  # the content never reaches stdout


# ---- loaders -------------------------------------------------------------------------------------------------


def _compressed(tests: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def _row(qid: str, day: str, functional: bool = False, compress: bool = True) -> dict:
    if functional:
        public = [{"input": "[1, 2, 3]\n2", "output": "[3, 4]", "testtype": "functional"}]
        private = [{"input": "[]\n1", "output": "[]", "testtype": "functional"}]
        starter, meta = "class Solution:\n    def pairs(self, xs: list, k: int) -> list:\n        ", {"func_name": "pairs"}
    else:
        public = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
        private = [{"input": "10 -4\n", "output": "6\n", "testtype": "stdin"}]
        starter, meta = "", {}
    return {
        "question_id": qid, "question_title": qid, "question_content": f"Problem {qid}: add the two numbers.",
        "platform": "leetcode" if functional else "atcoder", "contest_id": "c1", "contest_date": f"{day}T00:00:00",
        "starter_code": starter, "difficulty": "easy", "public_test_cases": json.dumps(public),
        "private_test_cases": _compressed(private) if compress else json.dumps(private), "metadata": json.dumps(meta),
    }  # fmt: skip


ROWS = [_row("early", "2024-07-31"), _row("first", "2024-08-01"), _row("fn", "2024-11-05", functional=True),
        _row("plain", "2025-01-31", compress=False), _row("late", "2025-02-01")]  # fmt: skip


def test_hub_loader_decodes_compressed_tests_and_keeps_the_window(monkeypatch) -> None:
    seen = {}

    def fake_load_hub(version_tag: str) -> list[dict]:
        seen["tag"] = version_tag
        return [dict(r) for r in ROWS]

    monkeypatch.setattr(lcb, "load_hub", fake_load_hub)
    task = ReasoningTask(benchmark="livecodebench", source="hub")
    problems = task.questions()
    assert seen["tag"] == "release_v5"
    assert [p["id"] for p in problems] == ["first", "fn", "plain"]  # [2024-08-01, 2025-02-01)
    fn = next(p for p in problems if p["id"] == "fn")
    assert fn["mode"] == "functional" and fn["func_name"] == "pairs" and len(fn["tests"]) == 2
    assert fn["tests"][1] == TestCase("[]\n1", "[]")  # the compressed private test
    wide = ReasoningTask(benchmark="livecodebench", source="hub", start_date=None, end_date=None)
    assert len(wide.questions()) == 5


def test_local_loader_prompt_extraction_and_scoring(tmp_path: Path) -> None:
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    task = ReasoningTask(benchmark="livecodebench", source="local", path=str(path), samples_per_question=2)
    samples = task.samples(None, 0)
    assert [s.id for s in samples] == ["first#0", "first#1", "fn#0", "fn#1", "plain#0", "plain#1"]
    fn = next(s for s in samples if s.id == "fn#0")
    assert "class Solution" in fn.prompt and "```python" in fn.prompt and fn.reference == "fn"
    assert "standard input" in samples[0].prompt
    good = "<think>try `x`</think>\n```python\nprint('draft')\n```\nFinal:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert task.score(samples[0], good) == {"accuracy": 1.0, "completion": 1.0, "tests_passed": 1.0, "verdict": "passed"}
    wrong = "```python\nprint(0)\n```"
    assert task.score(samples[0], wrong)["verdict"] == "wrong_answer"
    assert task.score(samples[0], "no code at all") == {"accuracy": 0.0, "completion": 0.0}
    solution = "```python\nclass Solution:\n    def pairs(self, xs, k):\n        return [x + k for x in xs[:2]]\n```"
    assert task.score(fn, solution)["accuracy"] == 1.0
    fresh = ReasoningTask(benchmark="livecodebench", source="local", path=str(path))
    assert fresh.score(Sample("fn#0", "", "fn", {"question_id": "fn"}), solution)["accuracy"] == 1.0
    assert ReasoningTask(benchmark="livecodebench", num_questions=2, samples_per_question=2).workload() == (4, 4096)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"question_id": None}, "line 1: lacks the field"),
        ({"public_test_cases": "not json, not base64"}, "field public_test_cases"),
        ({"public_test_cases": json.dumps([{"input": "1"}])}, "field public_test_cases\\[0\\]"),
        ({"contest_date": "yesterday"}, "field contest_date"),
        ({"metadata": "{"}, "field metadata"),
    ],
    ids=["missing-field", "bad-encoding", "test-without-output", "bad-date", "bad-metadata"],
)
def test_a_malformed_row_is_one_line_naming_row_and_field(tmp_path: Path, change: dict, match: str) -> None:
    row = _row("bad", "2024-09-01")
    for key, value in change.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match=match) as info:
        ReasoningTask(benchmark="livecodebench", source="local", path=str(path)).questions()
    assert "\n" not in str(info.value)


def test_compressed_tests_cannot_carry_code() -> None:
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/rb-pwned",))

    payload = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    with pytest.raises(ConfigError, match="compressed encoding"):
        lcb.decode_tests(payload, "row 0 field private_test_cases")
    assert not Path("/tmp/rb-pwned").exists()


def test_functional_problem_needs_a_function_name() -> None:
    row = _row("fn", "2024-09-01", functional=True)
    row["metadata"] = "{}"
    with pytest.raises(ConfigError, match="metadata.func_name"):
        lcb.parse_problem(row, "row 3")


# ---- end to end ------------------------------------------------------------------------------------------------


def test_end_to_end_run_on_tiny_random(tmp_path: Path) -> None:
    """The model writes no program; the run, its verdicts and metrics are complete anyway."""
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[1:4]) + "\n")
    metrics, results = run_cli(tmp_path, "model=tiny_random", "task=reasoning", "task.benchmark=livecodebench",
                               "task.source=local", f"task.path={path}", "task.max_new_tokens=8",
                               "task.samples_per_question=2", "method=quest", "method.budget=32")  # fmt: skip
    (samples,) = (results / "runs").glob("*/samples.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["first#0", "first#1", "fn#0", "fn#1", "plain#0", "plain#1"]
    assert all(r["score"]["accuracy"] == 0.0 and r["reference"] in ("first", "fn", "plain") for r in rows)
    assert metrics["metrics"]["n"] == 6 and metrics["metrics"]["accuracy"] == 0.0
    assert metrics["task_settings"]["benchmark"] == "livecodebench"


def test_bench_grader_writes_its_table(tmp_path: Path) -> None:
    from retrobench.drivers import bench_grader

    assert bench_grader.main(["--problems", "3", "--tests", "2", "--workers", "2", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "grader.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].startswith("correct,1,3,2,6,3")


def test_ordinary_solutions_import_what_they_need() -> None:
    """The sandbox refuses process creation and foreign files, not the standard library or numpy
    (which tries ctypes and sets environment variables on import)."""
    pytest.importorskip("numpy")
    code = ("import collections, heapq, bisect, itertools, functools, math, re, sys, typing, fractions, decimal\n"
            "import numpy as np\nprint(int(np.array([1, 2]).sum()) + int(input()))")  # fmt: skip
    assert grade(code, [TestCase("4\n", "7")], "stdin", limits=Limits(test_timeout_s=20.0)).passed
