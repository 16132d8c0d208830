"""LiveCodeBench (code generation) for ``task=reasoning task.benchmark=livecodebench``: problems,
prompt, extraction and the sandboxed grader.

Problems come as LiveCodeBench ships them (``livecodebench/code_generation_lite``): ``question_id``,
``question_title``, ``question_content``, ``platform``, ``contest_date``, ``starter_code``,
``difficulty``, ``public_test_cases`` (a JSON list of ``{input, output, testtype}``),
``private_test_cases`` (the same list, either plain JSON or compressed: base64 of zlib of a pickled
JSON string) and ``metadata`` (JSON with ``func_name`` for LeetCode-style problems). Both kinds run:
``testtype: stdin`` programs read standard input and print, ``functional`` ones complete the starter
code's ``class Solution`` method, called with one JSON value per input line and compared as JSON.
The compressed private tests are unpickled with an unpickler that refuses every global, so only
plain data (the JSON string) can come out of them.

Release and window: ``task.version_tag`` (``release_v5``) picks the hub release; problems with
``task.start_date <= contest_date < task.end_date`` are kept (v5's window by default:
2024-08-01 .. 2025-02-01). A local JSONL file (``task.source=local``) holds the same fields per line.

Prompt: the problem, then (with starter code) the code to complete, or (stdin problems) that the
program reads standard input and writes standard output, and a request for one fenced Python
block. Extraction takes the last fenced block after the reasoning (text after ``</think>`` when
present). Grading: :mod:`retrobench.tasks.lib.sandbox`, public tests first, then private, stopping at
the first failure; ``accuracy`` 1 when every test passes (pass@1 over the k samples).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from datetime import date, datetime
from typing import Any

from retrobench.conf import ConfigError
from retrobench.tasks.lib.sandbox import Limits, TestCase, Verdict, grade

HUB_ID = "livecodebench/code_generation_lite"
FIELDS = ("question_id", "question_content", "public_test_cases", "private_test_cases", "contest_date")
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in test data")


def decode_tests(raw: Any, where: str) -> list[dict[str, Any]]:
    """A test list as shipped: a list, a JSON string, or base64(zlib(pickle(JSON string)))."""
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: tests must be a JSON string or a list, got {type(raw).__name__}")
    if not raw.strip():
        return []
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        data = _DataOnly(io.BytesIO(zlib.decompress(base64.b64decode(raw.encode("utf-8"))))).load()
        return json.loads(data)
    except Exception as exc:  # noqa: BLE001 - any malformed encoding ends in one line
        raise ConfigError(f"{where}: neither JSON nor the compressed encoding ({type(exc).__name__})") from None


def parse_date(value: Any, where: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an ISO date (YYYY-MM-DD)") from None


def parse_problem(row: Any, where: str) -> dict[str, Any]:
    """One problem row as the task uses it; a malformed row raises one line naming the row and field."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a problem must be an object with {', '.join(FIELDS)}")
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise ConfigError(f"{where}: lacks the field(s) {', '.join(missing)}")
    qid = str(row["question_id"])
    tests: list[TestCase] = []
    kinds = set()
    for field in ("public_test_cases", "private_test_cases"):
        for i, case in enumerate(decode_tests(row[field], f"{where} ({qid}) field {field}")):
            if not isinstance(case, dict) or not {"input", "output"} <= set(case):
                raise ConfigError(f"{where} ({qid}) field {field}[{i}]: a test needs input and output")
            kinds.add(case.get("testtype", "stdin"))
            tests.append(TestCase(str(case["input"]), str(case["output"])))
    if not tests:
        raise ConfigError(f"{where} ({qid}) field public_test_cases: the problem has no tests")
    if len(kinds) > 1 or not kinds <= {"stdin", "functional"}:
        raise ConfigError(f"{where} ({qid}) field testtype: {sorted(kinds)}; allowed: one of stdin, functional")
    mode = kinds.pop()
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError:
            raise ConfigError(f"{where} ({qid}) field metadata: not JSON") from None
    func = str(meta.get("func_name") or "")
    if mode == "functional" and not func:
        raise ConfigError(f"{where} ({qid}) field metadata.func_name: needed by functional tests")
    return {
        "id": qid, "question": str(row["question_content"]), "starter": str(row.get("starter_code") or ""),
        "mode": mode, "func_name": func, "tests": tests, "date": parse_date(row["contest_date"], f"{where} ({qid}) field contest_date"),
        "answer": qid,
    }  # fmt: skip


def in_window(problems: list[dict[str, Any]], start: str | None, end: str | None) -> list[dict[str, Any]]:
    """Problems with ``start <= contest_date < end`` (either bound may be None)."""
    lo = parse_date(start, "task.start_date") if start else None
    hi = parse_date(end, "task.end_date") if end else None
    return [p for p in problems if (lo is None or p["date"] >= lo) and (hi is None or p["date"] < hi)]


def load_hub(version_tag: str) -> list[dict[str, Any]]:
    """The release's rows through ``datasets`` (its loading script takes ``version_tag``)."""
    import datasets

    return [dict(r) for r in datasets.load_dataset(HUB_ID, version_tag=version_tag, split="test", trust_remote_code=True)]


def prompt(problem: dict[str, Any]) -> str:
    """The question, the starter code or the stdin/stdout contract, and the answer format."""
    head = ("Solve the following programming problem. Reason about it first, then write a correct Python 3 "
            "program that passes all of its tests.\n\n### Problem\n" + problem["question"].strip() + "\n\n")  # fmt: skip
    if problem["starter"].strip():
        return head + ("### Format\nComplete the starter code below and give your whole solution as one "
                       f"```python fenced code block.\n```python\n{problem['starter'].rstrip()}\n```\n")  # fmt: skip
    return head + ("### Format\nYour program reads the input from standard input and writes the answer to standard "
                   "output (do not hard-code the sample tests). Give your whole program as one ```python fenced "
                   "code block.\n```python\n# your code here\n```\n")  # fmt: skip


def extract_code(text: str) -> str | None:
    """The last fenced code block of ``text`` (None: no fenced block)."""
    blocks = FENCE.findall(text)
    for lang, body in reversed(blocks):
        if lang.lower() in ("", "python", "python3", "py") and body.strip():
            return body
    return None


def grade_problem(code: str, problem: dict[str, Any], limits: Limits) -> Verdict:
    return grade(code, problem["tests"], problem["mode"], problem["func_name"], limits)


__all__ = ["HUB_ID", "decode_tests", "parse_date", "extract_code", "grade_problem", "in_window", "load_hub", "parse_problem", "prompt"]
