"""quest_page_scores (Triton) equals its reference, and the reference equals a brute-force bound.

Page scores: odd head dims, GQA ratios 1/3/4/8, the three GQA policies, ragged page counts,
empty pages, permuted page tables, fp32/fp16 (bf16 on the GPU). A last test runs QuestMethod's
selection and attention on the triton op table against the torch op table over a real
PagedKVCache. Fresh seed per test, printed on failure.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from retrobench.kernels._testing import assert_close, fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.quest import quest_page_scores, quest_page_scores_ref

TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1e-2, 1e-3)}



def make_meta(B, H, H_kv, D, n_pages, n_max, dtype, device="cpu", empty_frac=0.0):
    """Random per-page min/max in a permuted pool; a fraction of the valid pages left empty (+inf/-inf)."""
    pool = B * n_max + 5
    a, b = torch.randn(pool, H_kv, D), torch.randn(pool, H_kv, D)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    empty = torch.rand(pool) < empty_frac
    kmin[empty], kmax[empty] = float("inf"), float("-inf")
    page_table = torch.randperm(pool)[: B * n_max].view(B, n_max).to(torch.int32)
    q = torch.randn(B, H, D)
    n = torch.tensor(n_pages, dtype=torch.int32)
    to = {"dtype": dtype, "device": device}
    return q.to(**to), kmin.to(**to), kmax.to(**to), page_table.to(device), n.to(device)


SCORE_CASES = {
    "g1-d24": (2, 4, 4, 24, (7, 3), 9),
    "g3-d40": (2, 6, 2, 40, (9, 9), 9),
    "g4-d32-many-pages": (1, 8, 2, 32, (130,), 131),  # more pages than one program's block
    "g8-d64": (3, 8, 1, 64, (1, 5, 11), 12),
}


@pytest.mark.parametrize("dot", [False, True], ids=["elementwise", "dot"])
@pytest.mark.parametrize("empty_frac", [0.0, 0.3], ids=["dense", "empty-pages"])
@pytest.mark.parametrize("group_reduce", ["kv_head", "q_head", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(SCORE_CASES))
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")
def test_page_scores_match_reference(name, dtype, group_reduce, empty_frac, dot) -> None:
    needs_kernel_device("cpu")
    check_scores(SCORE_CASES[name], dtype, group_reduce, empty_frac, "cpu", {"dot": dot})


def check_scores(shape, dtype, group_reduce, empty_frac, device, config=None) -> None:
    seed = fresh_seed()
    B, H, H_kv, D, n_pages, n_max = shape
    args = make_meta(B, H, H_kv, D, n_pages, n_max, dtype, device, empty_frac)
    expected = quest_page_scores_ref(*args, group_reduce=group_reduce)
    with poisoned_empty():
        scores = quest_page_scores(*args, group_reduce=group_reduce, config=config)
    h_sel = {"kv_head": H_kv, "q_head": H, "layer": 1}[group_reduce]
    assert scores.shape == (B, h_sel, n_max) and scores.dtype == torch.float32
    assert_close("scores", scores, expected, *TOL[dtype], seed=seed)
    for b, n in enumerate(n_pages):  # the padding columns are -inf, the live ones finite
        assert torch.all(scores[b, :, n:] == float("-inf")), f"seed {seed}"
    if empty_frac == 0:
        assert torch.isfinite(scores[0, :, : n_pages[0]]).all(), f"seed {seed}"


def test_reference_is_the_brute_force_bound() -> None:
    """Column for column: Σ_d max(q_d kmax_d, q_d kmin_d) per query head, summed over the group."""
    seed = fresh_seed()
    q, kmin, kmax, page_table, n = make_meta(2, 6, 2, 5, (5, 8), 8, torch.float32)
    ref = quest_page_scores_ref(q, kmin, kmax, page_table, n, "kv_head")
    for b in range(2):
        for kv in range(2):
            for p in range(int(n[b])):
                phys = int(page_table[b, p])
                want = sum(
                    sum(max(float(q[b, h, d] * kmax[phys, kv, d]), float(q[b, h, d] * kmin[phys, kv, d])) for d in range(5))
                    for h in range(kv * 3, kv * 3 + 3)
                )
                assert abs(float(ref[b, kv, p]) - want) < 1e-4, f"seed {seed}"


# ---- Quest's selection and attention on both op tables ---------------------------------------------
@pytest.mark.parametrize("selection", ["kv_head", "q_head", "layer"])
def test_quest_method_on_triton_ops_equals_torch_ops(selection) -> None:
    """QuestMethod.select + attend_selection on the triton op table equal the same code on the torch one."""
    needs_kernel_device("cpu")
    from harness import forward_for

    from retrobench.kernels.ops import TORCH_OPS, TRITON_OPS
    from retrobench.methods.base import ModelSpec
    from retrobench.methods.common import attend_selection
    from retrobench.methods.quest import QuestMethod

    from retrobench.engine.cache import PagedKVCache

    seed = fresh_seed()
    B, H, H_kv, D, P, T = 2, 6, 2, 24, 4, 45
    spec = ModelSpec(1, H, H_kv, D, P)
    cache = PagedKVCache(1, H_kv, D, P, max_tokens=48, batch_size=B)
    cache.remap(cache.page_table[:, torch.randperm(cache.pages_per_seq)])  # non-contiguous logical -> physical
    pos = torch.arange(T).expand(B, T)
    TORCH_OPS.write_kv(cache.k[0], cache.v[0], cache.page_table, pos, torch.randn(B, H_kv, T, D), torch.randn(B, H_kv, T, D))
    TORCH_OPS.update_page_minmax(cache.k[0], cache.kmin[0], cache.kmax[0], cache.page_table, pos, torch.full((B,), T))
    method = QuestMethod(budget={"tokens": 16}, selection=selection, dense_layers=0)
    q = torch.randn(B, H, 1, D)
    results = {}
    for ops in (TORCH_OPS, TRITON_OPS):
        state = method.new_state(spec, B, 48, torch.device("cpu"))
        fwd = forward_for(method, spec, cache, state, torch.full((B, 1), T - 1), ops=ops)
        sel = method.select(0, q[:, :, -1], fwd, state)
        results[ops.name] = (sel.units, *attend_selection(0, q, fwd, sel))
    units, out, lse = results["triton"]
    assert torch.equal(units, results["torch"][0]), f"seed {seed}"
    assert_close("out", out, results["torch"][1], 2e-5, 2e-5, seed=seed)
    assert_close("lse", lse, results["torch"][2], 2e-5, 2e-5, seed=seed)


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dot", [False, True], ids=["elementwise", "dot"])
@pytest.mark.parametrize("group_reduce", ["kv_head", "q_head", "layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_page_scores_match_reference_gpu(dtype, group_reduce, dot) -> None:
    needs_kernel_device("cuda")
    check_scores((2, 32, 8, 128, (256, 190), 257), dtype, group_reduce, 0.05, "cuda", {"dot": dot})
