"""topk_forced (the static-shape op of the triton backend) equals its reference, a stable sort,
list for list — ties included, since both order equal scores by ascending index: both its
versions (the selecting Triton kernel, the packed-key ``torch.topk``) and the dispatch between them.

Random scores with many exact ties (few distinct values, -0.0 beside +0.0, -inf entries), with
and without a forced entry, k from 1 to past the valid entries, k_max wider than the row.
Fresh seed per test, printed on failure.
"""

from __future__ import annotations

import pytest
import torch

from retrobench.kernels import topk as topk_mod
from retrobench.kernels._testing import fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.topk import topk_forced, topk_forced_packed, topk_forced_ref, topk_forced_select

IMPLS = {"packed": topk_forced_packed, "select": topk_forced_select}


def tied_scores(B: int, H_sel: int, N: int, valid: list[int]) -> torch.Tensor:
    """Scores drawn from a handful of values (ties everywhere), both zeros, -inf past ``valid[b]``."""
    levels = torch.tensor([-2.5, -0.0, 0.0, 0.75, 3.0, float("-inf")])
    scores = levels[torch.randint(0, len(levels), (B, H_sel, N))]
    for b, n in enumerate(valid):
        scores[b, :, n:] = float("-inf")
    return scores


@pytest.mark.parametrize("forced", [True, False], ids=["forced", "free"])
@pytest.mark.parametrize(
    ("valid", "k", "k_max"),
    [((9, 4), (3, 3), 5), ((9, 4), (1, 1), 4), ((6, 2), (6, 5), 6), ((12, 12), (12, 4), 12), ((5, 3), (2, 4), 9)],
    ids=["ordinary", "k1", "k-past-valid", "k-eq-n", "wide-kmax"],
)
@pytest.mark.parametrize("h_sel", [1, 3])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_reference_with_ties(valid, k, k_max, h_sel, forced, impl) -> None:
    if impl == "select":
        needs_kernel_device("cpu")
    seed = fresh_seed()
    B, N = len(valid), max(valid)
    scores = tied_scores(B, h_sel, N, list(valid))
    f = torch.tensor([n - 1 - (b % 2) for b, n in enumerate(valid)]) if forced else None
    k_t = torch.tensor(k)
    with poisoned_empty():
        got = IMPLS[impl](scores, k_t, k_max, f)
    want = topk_forced_ref(scores, k_t, k_max, f)
    assert got.shape == (B, h_sel, k_max) and got.dtype == torch.int32
    assert torch.equal(got, want), f"seed {seed}: {got.tolist()} vs {want.tolist()}"
    if forced:
        assert torch.all(got[:, :, 0] == f.view(B, 1)), f"seed {seed}"


def test_reference_semantics() -> None:
    """Forced first, then descending score, ties by ascending index, -inf never, -1 after."""
    inf = float("-inf")
    scores = torch.tensor([[[5.0, inf, 1.0, inf, 2.0, 2.0]]])
    assert topk_forced_ref(scores, torch.tensor([4]), 5, torch.tensor([1])).tolist() == [[[1, 0, 4, 5, -1]]]
    assert topk_forced_ref(scores, torch.tensor([9]), 6, None).tolist() == [[[0, 4, 5, 2, -1, -1]]]
    for impl in IMPLS.values():
        if impl is topk_forced_select and not _kernel_device():
            continue
        assert impl(scores, torch.tensor([9]), 6, None).tolist() == [[[0, 4, 5, 2, -1, -1]]]


def _kernel_device() -> bool:
    from retrobench.kernels._triton import triton_usable

    return triton_usable(torch.empty(0))


def test_dispatch_takes_the_kernel_where_the_row_fits(monkeypatch) -> None:
    """The op runs the selecting kernel where Triton runs and the row fits, else the packed version."""
    calls = []
    monkeypatch.setattr(topk_mod, "topk_forced_select", lambda *a: calls.append("select") or topk_forced_ref(*a))
    monkeypatch.setattr(topk_mod, "topk_forced_packed", lambda *a: calls.append("packed") or topk_forced_ref(*a))
    k = torch.tensor([2])
    topk_mod.topk_forced(torch.randn(1, 1, 8), k, 2, None)
    topk_mod.topk_forced(torch.randn(1, 1, topk_mod.SELECT_MAX + 1), k, 2, None)
    assert calls == (["select"] if _kernel_device() else ["packed"]) + ["packed"]


def test_select_kernel_long_rows_and_wide_lists() -> None:
    """Rows of a few hundred entries (several sort stages, odd N) and lists wider than the row."""
    needs_kernel_device("cpu")
    seed = fresh_seed()
    for N, k_max, k in ((300, 40, (40, 17)), (37, 80, (80, 5))):
        scores = tied_scores(2, 2, N, [N, N - 3])
        scores[0, 0] = torch.randn(N)  # one row of distinct values
        forced = torch.tensor([N - 1, 0])
        k_t = torch.tensor(k)
        with poisoned_empty():
            got = topk_forced_select(scores, k_t, k_max, forced)
        assert torch.equal(got, topk_forced_ref(scores, k_t, k_max, forced)), f"seed {seed} N {N}"


@pytest.mark.gpu
def test_matches_reference_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seed = fresh_seed()
    scores = tied_scores(2, 8, 256, [256, 190]).cuda()
    forced = torch.tensor([255, 189], device="cuda")
    k = torch.tensor([128, 100], device="cuda")
    want = topk_forced_ref(scores, k, 128, forced)
    for name, impl in IMPLS.items():
        with poisoned_empty():
            got = impl(scores, k, 128, forced)
        assert torch.equal(got, want), f"{name} seed {seed}"
    long = torch.randn(1, 8, 8192, device="cuda")  # 128K tokens of pages: the largest block in use
    k = torch.tensor([1229], device="cuda")
    assert torch.equal(topk_forced_select(long, k, 1229, None), topk_forced_ref(long, k, 1229, None)), f"seed {seed}"
