"""``python -m retrobench.bench_batch`` end to end on tiny_random (CPU): both runs, the table, equal texts; and
``bench_cli``'s table naming the runs that left no row."""

from __future__ import annotations

import csv
from pathlib import Path

from retrobench.drivers import bench_batch


def test_bench_batch_writes_both_rows_with_equal_outputs(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = bench_batch.main(["--model", "tiny_random", "--task", "synthetic", "--samples", "4", "--new-tokens", "8",
                             "--batch", "3", "--device", "cpu", "--out", str(out), "--results-dir", str(tmp_path / "runs"),
                             "task.context_tokens=320", "task.num_queries=2"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((out / "batch.csv").open()))
    assert [r["batch_size"] for r in rows] == ["3", "1"]
    batched, single = rows
    assert batched["samples"] == single["samples"] == "4" and batched["new_tokens"] == single["new_tokens"]
    assert batched["same_output"] == batched["compared"] == "4"  # fp32 on CPU: the same text at any batch size
    assert float(batched["speedup"]) > 0 and float(single["tokens_per_s"]) > 0
    assert "| 3 | 4 |" in (out / "batch.md").read_text()


def test_bench_cli_names_the_runs_without_a_row(tmp_path):
    """A method whose latency run failed is named under the table and fails the script, not dropped."""
    from retrobench.drivers import bench_cli

    row = {c: "" for c in bench_cli.COLUMNS}
    row.update({"method": "full", "backend": "triton", "tpot_p50_ms": 6.0, "tpot_p10_ms": 5.9, "tpot_p90_ms": 6.1,
                "ttft_s": 1.0, "device": "GPU", "git_sha": "abc"})  # fmt: skip
    missing = bench_cli.write([row], tmp_path, 32768, asked=[("full", "triton"), ("infllm", "triton")])
    assert missing == [("infllm", "triton")]
    text = (tmp_path / "latency_cli.md").read_text()
    assert "| full | triton | 6.00 |" in text and "No row" in text and "infllm on triton" in text
