"""quest_page_scores (Triton) and quest_select (torch, no host syncs) equal their references,
which are the method code itself (methods/quest.py, methods/common.py).

Page scores: odd head dims, GQA ratios 1/3/4/8, the three GQA policies, ragged page counts,
empty pages, permuted page tables, fp32/fp16 (bf16 on the GPU). Selection: tie-free random
scores (topk and a stable sort agree only without ties), k from 1 to past the valid pages.
A last test runs the kernel pipeline (scores -> select -> sparse attention) against the torch
method path on a real PagedKVCache. Fresh seed per test, printed on failure.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from retrobench.kernels._testing import assert_close, fresh_seed, poisoned_empty
from retrobench.kernels._triton import triton_usable
from retrobench.kernels.quest import (
    quest_page_scores,
    quest_page_scores_ref,
    quest_select,
    quest_select_ref,
)

TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1e-2, 1e-3)}


def _needs_kernel_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not triton_usable(torch.empty(0, device=device)):
        pytest.skip("Triton cannot run here (set TRITON_INTERPRET=1 before Python starts, or use a GPU)")


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


@pytest.mark.parametrize("empty_frac", [0.0, 0.3], ids=["dense", "empty-pages"])
@pytest.mark.parametrize("group_reduce", ["kv_head", "q_head", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_page_scores_match_reference(name, dtype, group_reduce, empty_frac) -> None:
    _needs_kernel_device("cpu")
    check_scores(SCORE_CASES[name], dtype, group_reduce, empty_frac, "cpu")


def check_scores(shape, dtype, group_reduce, empty_frac, device) -> None:
    seed = fresh_seed()
    B, H, H_kv, D, n_pages, n_max = shape
    args = make_meta(B, H, H_kv, D, n_pages, n_max, dtype, device, empty_frac)
    expected = quest_page_scores_ref(*args, group_reduce=group_reduce)
    with poisoned_empty():
        scores = quest_page_scores(*args, group_reduce=group_reduce)
    h_sel = {"kv_head": H_kv, "q_head": H, "layer": 1}[group_reduce]
    assert scores.shape == (B, h_sel, n_max) and scores.dtype == torch.float32
    assert_close("scores", scores, expected, *TOL[dtype], seed=seed)
    for b, n in enumerate(n_pages):  # the padding columns are -inf, the live ones finite
        assert torch.all(scores[b, :, n:] == float("-inf")), f"seed {seed}"
    if empty_frac == 0:
        assert torch.isfinite(scores[0, :, : n_pages[0]]).all(), f"seed {seed}"


def test_reference_is_the_method_definition() -> None:
    """On non-empty pages the reference is methods/quest.py + reduce_head_scores, column for column."""
    from retrobench.methods.common import reduce_head_scores
    from retrobench.methods.quest import quest_page_scores as method_scores

    seed = fresh_seed()
    q, kmin, kmax, page_table, n = make_meta(2, 6, 2, 40, (5, 8), 8, torch.float32)
    ref = quest_page_scores_ref(q, kmin, kmax, page_table, n, "kv_head")
    for b in range(2):
        phys = page_table[b, : int(n[b])].long()
        direct = reduce_head_scores(method_scores(q[b], kmin[phys], kmax[phys]), "kv_head", 2)
        assert torch.equal(ref[b, :, : int(n[b])], direct), f"seed {seed}"


def tie_free_scores(B, H_sel, n_max, valid):
    scores = torch.randperm(B * H_sel * n_max).view(B, H_sel, n_max).float() / 7.0 - 3.0
    for b, n in enumerate(valid):
        scores[b, :, n:] = float("-inf")
    return scores


def as_sets(pages: torch.Tensor) -> list:
    return [[sorted(x for x in row if x >= 0) for row in seq] for seq in pages.tolist()]


@pytest.mark.parametrize(
    "valid,k,k_max",
    [
        ((9, 4), (3, 3), 5),  # ordinary
        ((9, 4), (1, 1), 4),  # only the forced page
        ((6, 2), (6, 5), 6),  # k >= valid pages: all of them
        ((12, 12), (12, 4), 12),  # k == n_max
        ((5, 3), (2, 4), 9),  # k_max wider than n_max - 1
    ],
    ids=["ordinary", "k1", "k-past-valid", "k-eq-n", "wide-kmax"],
)
@pytest.mark.parametrize("h_sel", [1, 3])
def test_select_matches_reference(valid, k, k_max, h_sel) -> None:
    seed = fresh_seed()
    B, n_max = len(valid), max(valid)
    scores = tie_free_scores(B, h_sel, n_max, valid)
    forced = torch.tensor([n - 1 - (b % 2) for b, n in enumerate(valid)], dtype=torch.int32)  # not always the top
    k_t = torch.tensor(k, dtype=torch.int32)
    pages = quest_select(scores, k_t, k_max, forced)
    expected = quest_select_ref(scores, k_t, k_max, forced)
    assert pages.shape == (B, h_sel, k_max) and pages.dtype == torch.int32
    assert as_sets(pages) == as_sets(expected), f"seed {seed}: {pages.tolist()} vs {expected.tolist()}"
    assert torch.all(pages[:, :, 0] == forced.view(B, 1)), f"seed {seed}"
    for b in range(B):
        want = min(k[b], k_max, valid[b])
        assert all(len(row) == want for row in as_sets(pages)[b]), f"seed {seed}"


def test_select_skips_empty_pages_inside_the_range() -> None:
    scores = torch.tensor([[[5.0, float("-inf"), 1.0, float("-inf"), 2.0]]])
    pages = quest_select(scores, torch.tensor([4]), 4, torch.tensor([4]))
    assert pages.tolist() == [[[4, 0, 2, -1]]]
    assert as_sets(quest_select_ref(scores, torch.tensor([4]), 4, torch.tensor([4]))) == [[[0, 2, 4]]]


# ---- the kernel pipeline against the torch method path --------------------------------------------
@pytest.mark.parametrize("selection", ["kv_head", "layer"])
def test_pipeline_matches_quest_method(selection) -> None:
    """scores -> select -> sparse_paged_attention equals QuestMethod.select + attend_selection."""
    _needs_kernel_device("cpu")
    from retrobench.kernels.paged_attention import sparse_paged_attention
    from retrobench.methods.common import attend_selection
    from retrobench.methods.quest import QuestMethod

    from retrobench.engine.cache import PagedKVCache

    seed = fresh_seed()
    B, H, H_kv, D, P, lengths = 2, 6, 2, 24, 4, (45, 33)
    cache = PagedKVCache(1, H_kv, D, P, max_tokens=48, batch_size=B)
    cache.remap(cache.page_table[:, torch.randperm(cache.pages_per_seq)])  # non-contiguous logical -> physical
    for b, T in enumerate(lengths):
        pos = torch.arange(T).view(1, T)
        cache.reserve(pos, torch.tensor([b]))
        cache.write(0, pos, torch.randn(1, H_kv, T, D), torch.randn(1, H_kv, T, D), torch.tensor([b]))
    method = QuestMethod(budget={"tokens": 16}, selection=selection, dense_layers=0)
    q = torch.randn(B, H, 1, D)
    scaling = D**-0.5

    page_table = cache.page_table.to(torch.int32)
    n_pages = torch.tensor([math.ceil(T / P) for T in lengths], dtype=torch.int32)
    k = torch.tensor([method.budget.num_pages(T, P, method.min_pages) for T in lengths], dtype=torch.int32)
    scores = quest_page_scores(q[:, :, 0], cache.kmin[0], cache.kmax[0], page_table, n_pages, selection)
    pages = quest_select(scores, k, int(k.max()), n_pages - 1)
    if selection == "layer":
        pages = pages.expand(B, H_kv, -1)
    q_pos = torch.tensor([[T - 1] for T in lengths], dtype=torch.int32)
    out, lse = sparse_paged_attention(q, cache.k[0], cache.v[0], page_table, pages, q_pos, scaling)

    for b, T in enumerate(lengths):
        select, _ = method.select(0, q[b, :, -1], cache, b, T, None, scaling)
        ref_out, ref_lse, _ = attend_selection(
            q[b], cache.keys(0, b, T), cache.values(0, b, T), torch.tensor([T - 1]), scaling, select,
            cache.live_mask(0, b, T),
        )  # fmt: skip
        assert_close(f"out[{b}]", out[b], ref_out, 2e-5, 2e-5, seed=seed)
        assert_close(f"lse[{b}]", lse[b], ref_lse, 2e-5, 2e-5, seed=seed)


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("group_reduce", ["kv_head", "q_head", "layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_page_scores_match_reference_gpu(dtype, group_reduce) -> None:
    _needs_kernel_device("cuda")
    check_scores((2, 32, 8, 128, (256, 190), 257), dtype, group_reduce, 0.05, "cuda")


@pytest.mark.gpu
def test_select_matches_reference_gpu() -> None:
    seed = fresh_seed()
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    scores = tie_free_scores(2, 8, 256, (256, 190)).cuda()
    forced = torch.tensor([255, 189], dtype=torch.int32, device="cuda")
    k = torch.tensor([128, 100], dtype=torch.int32, device="cuda")
    pages = quest_select(scores, k, 128, forced)
    assert as_sets(pages) == as_sets(quest_select_ref(scores, k, 128, forced)), f"seed {seed}"
