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


def test_bench_kernels_smoke_checks_every_setting_against_the_default(tmp_path: Path) -> None:
    from retrobench.drivers.bench_kernels import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels_smoke.csv").open()))
    ops = {r["op"] for r in rows}
    assert ops == {"quest_page_scores", "topk_forced_select", "sparse_paged_attention"}
    for op in ops:  # one default per cell, listed first; every other setting agrees with it
        cells = {r["cell"] for r in rows if r["op"] == op}
        for cell in cells:
            rs = [r for r in rows if r["op"] == op and r["cell"] == cell]
            assert [r["default"] for r in rs].count("True") == 1 and rs[0]["default"] == "True"
            assert len({r["setting"] for r in rs}) == len(rs) > 1
            assert all(r["same_output"] == "True" and float(r["p50_us"]) > 0 for r in rs)
    assert "dot=1" in (tmp_path / "kernels_smoke.md").read_text()
    assert main(["--smoke", "--ops", "scores,nope", "--out", str(tmp_path)]) == 2
