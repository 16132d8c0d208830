"""The decode benchmark's smoke mode runs end to end on CPU (interpreter) and writes its table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def test_bench_decode_smoke_writes_rows(tmp_path: Path) -> None:
    from retrobench.drivers.bench_decode import main

    assert main(["--smoke", "--iters", "1", "--out", str(tmp_path)]) == 0
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


def test_profile_kinds_and_cpu_refusal(capsys) -> None:
    from retrobench.drivers import bench_profile

    kinds = {name: bench_profile.kind_of(name) for name in (
        "_sparse_paged_attention_kernel", "nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "triton_red_fused_add_mean_pow_0",
        "void at::native::vectorized_elementwise_kernel<4, ...>", "void at::native::index_elementwise_kernel<...>",
        "void at::native::sbtopk::gatherTopK<...>", "something_else", "_retro_merge_kernel", "_topk_forced_select_kernel",
        "void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFloat16, long>")}  # fmt: skip
    assert list(kinds.values()) == ["retrobench triton", "projections (GEMM)", "fused elementwise (inductor)",
                                    "copy / elementwise", "index / scatter / gather", "top-k / sort", "other",
                                    "retrobench triton", "top-k / sort", "index / scatter / gather"]
    if not torch.cuda.is_available():
        assert bench_profile.main(["--out", "/nonexistent-unused"]) == 2
        assert "run it on a GPU" in capsys.readouterr().out
