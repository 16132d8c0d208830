"""Offline stand-ins for the reasoning and code benchmarks, for ``make reproduce PROFILE=small``.

The small profile (no GPU, no network) replaces AIME24, GPQA-Diamond and LiveCodeBench with seeded
files in their formats (``task.source=local`` JSONL), written here: identical on every machine and
rewritten only when missing. ``retrobench.drivers.reproduce`` substitutes their folder into the
overrides of ``conf/reproduce.yaml``; ``bench grader`` times the sandbox on the code problems.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from retrobench.tasks.lib.longgenbench_data import choice_problem, gsm8k_problem


def write_offline_data(folder: Path, questions: int = 30) -> None:
    """Offline stand-ins for the reasoning benchmarks, as ``task.source=local`` JSONL files.

    ``aime24.jsonl``: templated two-step arithmetic word problems with integer answers;
    ``gpqa_diamond.jsonl``: 4-option questions (categories, capitals, sums ...). Both come from the
    LongGenBench synthetic generators (exact answers), seeded, so the files are identical on every
    machine and rewritten only when missing. ``livecodebench.jsonl``: small stdin programs (sum,
    maximum, reversal of n numbers) and one LeetCode-style function, in LiveCodeBench's fields and
    inside v5's date window, their tests computed here.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aime24.jsonl"
    if not path.is_file():
        rng = random.Random("retrobench.reproduce/aime24")
        rows = []
        for i in range(questions):
            item = gsm8k_problem(rng)
            rows.append({"id": f"offline-aime24-{i}", "question": item.text, "answer": item.gold})
        _write_jsonl(path, rows)
    path = folder / "gpqa_diamond.jsonl"
    if not path.is_file():
        rng = random.Random("retrobench.reproduce/gpqa")
        rows = []
        for i in range(questions):
            item = choice_problem(rng, "ABCD")
            question, _, options = item.text.rpartition("\n")
            choices = [part.split(") ", 1)[1].strip() for part in options.split(" (") if ") " in part]
            if len(choices) != 4:
                continue
            rows.append(
                {"id": f"offline-gpqa-{i}", "question": question, "choices": choices, "answer": item.gold}
            )
        _write_jsonl(path, rows)
    path = folder / "livecodebench.jsonl"
    if not path.is_file():
        _write_jsonl(path, offline_code_problems(questions))


def offline_code_problems(count: int) -> list[dict[str, Any]]:
    """Stand-in LiveCodeBench problems (stdin and functional) with computed tests, seeded."""
    rng = random.Random("retrobench.reproduce/livecodebench")
    kinds = [("sum", "print the sum", sum), ("max", "print the largest", max),
             ("reverse", "print them in reverse order, space-separated", None)]  # fmt: skip
    rows = []
    for i in range(count):
        name, what, fn = kinds[i % len(kinds)]
        tests = []
        for _ in range(4):
            xs = [rng.randint(-50, 50) for _ in range(rng.randint(1, 6))]
            out = " ".join(map(str, reversed(xs))) if fn is None else str(fn(xs))
            tests.append({"input": f"{len(xs)}\n{' '.join(map(str, xs))}\n", "output": out + "\n", "testtype": "stdin"})
        rows.append({
            "question_id": f"offline-lcb-{i}", "question_title": name, "platform": "atcoder", "contest_id": "offline",
            "question_content": f"The first line holds n, the second n integers. {what.capitalize()} of the n integers.",
            "contest_date": f"2024-{8 + i % 5:02d}-{1 + i % 28:02d}T00:00:00", "starter_code": "", "difficulty": "easy",
            "public_test_cases": json.dumps(tests[:1]), "private_test_cases": json.dumps(tests[1:]), "metadata": "{}",
        })  # fmt: skip
    tests = [{"input": json.dumps(xs), "output": json.dumps(sorted(xs)), "testtype": "functional"}
             for xs in ([3, 1, 2], [5], [], [-1, 4, -9])]  # fmt: skip
    rows.append({
        "question_id": "offline-lcb-sort", "question_title": "sort", "platform": "leetcode", "contest_id": "offline",
        "question_content": "Return the list nums sorted in ascending order.", "contest_date": "2024-09-15T00:00:00",
        "starter_code": "class Solution:\n    def sortList(self, nums: list[int]) -> list[int]:\n        ",
        "difficulty": "easy", "public_test_cases": json.dumps(tests[:1]), "private_test_cases": json.dumps(tests[1:]),
        "metadata": json.dumps({"func_name": "sortList"}),
    })  # fmt: skip
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
