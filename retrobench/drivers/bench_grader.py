"""Throughput of the LiveCodeBench sandbox grader: programs per second over a problem file.

``python -m retrobench.bench_grader`` writes ``<out>/grader.csv`` and ``.md``: it builds ``--problems``
stand-in problems of ``--tests`` tests each (stdin programs: sum / maximum / reversal of n numbers,
in LiveCodeBench's fields), grades a correct solution of every problem through the task's scorer
(so every test runs: a program per test) with 1 worker and with ``--workers`` workers (the run
layer's grader pool uses one per CPU core), and a wrong one (stops at the first test), and reports
programs/s. It also records what the sandbox enforces on this machine (run as nobody, network
namespace).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SOLUTIONS = {"sum": "input()\nprint(sum(map(int, input().split())))",
             "max": "input()\nprint(max(map(int, input().split())))",
             "reverse": "input()\nprint(*reversed(input().split()))"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from retrobench.tasks.lib import sandbox
    from retrobench.tasks.lib.offline_data import offline_code_problems
    from retrobench.tasks.reasoning import ReasoningTask

    parser = argparse.ArgumentParser(prog="python -m retrobench.bench_grader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    rows = [r for r in offline_code_problems(args.problems * 2) if r["question_title"] in SOLUTIONS][: args.problems]
    for r in rows:  # widen to --tests tests: repeat the row's tests with shifted numbers
        tests = json.loads(r["public_test_cases"]) + json.loads(r["private_test_cases"])
        r["private_test_cases"] = json.dumps((tests * args.tests)[1 : args.tests])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "problems.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = ReasoningTask(benchmark="livecodebench", source="local", path=str(path), start_date=None, end_date=None)
        samples = task.samples(None, 0)
        title = {r["question_id"]: r["question_title"] for r in rows}
        out = []
        for label, answer, workers in (("correct", None, 1), ("correct", None, args.workers), ("wrong", "print(0)", args.workers)):
            def score(sample):  # noqa: ANN001, ANN202
                code = answer or SOLUTIONS[title[sample.meta["question_id"]]]
                return task.score(sample, f"```python\n{code}\n```")

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                scores = list(pool.map(score, samples))
            elapsed = time.perf_counter() - started
            programs = sum(round(s["tests_passed"] * args.tests) if s["verdict"] == "passed" else 1 for s in scores)
            out.append({"solutions": label, "workers": workers, "problems": len(samples), "tests": args.tests,
                        "programs": programs, "passed": sum(s["accuracy"] for s in scores), "seconds": elapsed,
                        "programs_per_s": programs / elapsed, "as_nobody": sandbox._drop_to_nobody(),
                        "net_namespace": sandbox._net_namespace(), "cpus": os.cpu_count(),
                        "machine": platform.machine(), "python": platform.python_version()})  # fmt: skip
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / "grader.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    lines = [f"# LiveCodeBench grader throughput ({out[0]['cpus']} CPUs, {out[0]['machine']}, Python {out[0]['python']})",
             "", f"{args.problems} problems x {args.tests} tests, one sandboxed `python -I` process per test; run as "
             f"nobody: {out[0]['as_nobody']}, empty network namespace: {out[0]['net_namespace']}.", "",
             "| solutions | workers | programs | passed | seconds | programs/s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in out:
        lines.append(f"| {r['solutions']} | {r['workers']} | {r['programs']} | {r['passed']:.0f}/{r['problems']} | "
                     f"{r['seconds']:.1f} | {r['programs_per_s']:.1f} |")  # fmt: skip
    (dest / "grader.md").write_text("\n".join(lines) + "\n")
    print((dest / "grader.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
