"""The decode benchmark's smoke mode runs end to end on CPU (interpreter) and writes its table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_bench_decode_smoke_writes_rows(tmp_path: Path) -> None:
    from retrobench.drivers.bench_decode import main

    assert main(["--smoke", "--iters", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "decode_smoke.csv").open()))
    steps = [r for r in rows if r["op"] == "decode_step"]
    assert {r["method"] for r in steps} == {"full", "quest", "retro", "tova"}
    for r in steps:
        assert float(r["p50_ms"]) > 0
        if r["method"] != "tova":  # methods without a floor model leave it blank
            assert int(r["bytes"]) > 0 and float(r["floor_ms"]) > 0
        else:
            assert r["bytes"] == r["floor_ms"] == ""
    # quest reads fewer KV bytes than full at the same context and batch
    by = {r["method"]: int(r["bytes"]) for r in steps if r["bytes"]}
    assert by["quest"] < by["full"] and by["retro"] == by["quest"]
    assert "retro/quest" in (tmp_path / "decode_smoke.md").read_text()
