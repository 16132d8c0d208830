"""``python -m retrobench.bench_batch`` end to end on tiny_random (CPU): both runs, the table, equal texts."""

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
