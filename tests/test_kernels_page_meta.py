"""update_page_minmax (Triton) equals its reference and PagedKVCache's own metadata, bit for bit.

kmin/kmax start poisoned (NaN): pages the write touched must come back exact, the others must
stay untouched. Appends, overwrites in the middle of a page, duplicates on one page, runs on one
page (read by their first position only), padding positions (-1) before page 0, lengths at page
boundaries (k*P and k*P+1), permuted page tables, fp32/fp16.
Fresh seed per test, printed on failure.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from retrobench.kernels._testing import fresh_seed, needs_kernel_device
from retrobench.kernels.page_meta import update_page_minmax, update_page_minmax_ref



CASES = {
    # name: (H_kv, D, P, lengths, positions per sequence (-1 = padding))
    "append-d24-p4": (2, 24, 4, (37, 20), ((36,), (19,))),
    "kP-and-kP+1": (3, 40, 8, (48, 49), ((47, 40, -1), (48, 47, 46))),
    "overwrite-window": (1, 16, 16, (70, 33), ((66, 67, 68, 69), (29, 30, 31, 32))),
    "duplicates-and-padding": (2, 24, 4, (21, 9), ((20, 20, 17, -1), (-1, -1, 8, 1))),
    "big-page": (2, 80, 64, (130, 64), ((100, 129), (63, 0))),
    # runs on one page are read by their first position only: padding right before a position on
    # page 0 (C division gives -1 // P = 0), a prefill chunk starting mid-page, a repeat after a run
    "padding-before-page-0": (2, 24, 4, (12, 23), ((-1, 2, 3, 9, 10, 2, -1, -1), tuple(range(5, 13)))),
}


def make_inputs(H_kv, D, P, lengths, positions, dtype, device="cpu"):
    B = len(lengths)
    n_max = math.ceil(max(lengths) / P) + 1
    pool = B * n_max + 2
    k_cache = torch.randn(pool, P, H_kv, D).to(dtype=dtype, device=device)
    page_table = torch.randperm(pool)[: B * n_max].view(B, n_max).to(torch.int32).to(device)
    kmin = torch.full((pool, H_kv, D), float("nan"), dtype=dtype, device=device)
    kmax = kmin.clone()
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    return k_cache, kmin, kmax, page_table, pos, torch.tensor(lengths, device=device)


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["pos64", "pos32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, pos_dtype) -> None:
    needs_kernel_device("cpu")
    check(CASES[name], dtype, pos_dtype, "cpu")


def check(case, dtype, pos_dtype, device) -> None:
    seed = fresh_seed()
    k_cache, kmin, kmax, page_table, pos, lengths = make_inputs(*case, dtype, device)
    pos = pos.to(pos_dtype)
    ref_min, ref_max = kmin.clone(), kmax.clone()
    update_page_minmax_ref(k_cache, ref_min, ref_max, page_table, pos, lengths)
    update_page_minmax(k_cache, kmin, kmax, page_table, pos, lengths)
    assert torch.equal(kmin.isnan(), ref_min.isnan()), f"touched pages differ (seed {seed})"
    assert torch.equal(kmin.nan_to_num(0.0), ref_min.nan_to_num(0.0)), f"kmin differs (seed {seed})"
    assert torch.equal(kmax.nan_to_num(0.0), ref_max.nan_to_num(0.0)), f"kmax differs (seed {seed})"
    P = k_cache.shape[1]
    touched = {int(page_table[b, p // P]) for b, row in enumerate(pos.tolist()) for p in row if p >= 0}
    assert touched and all(not kmin[t].isnan().any() for t in touched), f"seed {seed}"
    assert int(kmin.isnan().any(-1).any(-1).sum()) == kmin.shape[0] - len(touched), f"seed {seed}"


def test_incremental_refresh_equals_a_recomputation() -> None:
    """Appends, then a RetroAttention-style overwrite, each followed by the kernel's refresh of the
    touched pages, leave the metadata a one-shot recomputation from the final keys gives."""
    needs_kernel_device("cpu")
    from retrobench.engine.cache import PagedKVCache
    from retrobench.kernels.kv_write import write_kv

    seed = fresh_seed()
    B, H_kv, D, P = 2, 2, 24, 4
    cache = PagedKVCache(1, H_kv, D, P, max_tokens=40, batch_size=B)
    cache.remap(cache.page_table[:, torch.randperm(cache.pages_per_seq)])
    lengths = torch.tensor([33, 24])  # 24 = 6 * P
    table = cache.page_table
    for t in range(int(lengths.max())):  # token by token, as decode appends
        pos = torch.full((B, 1), t).clamp(max=lengths.view(B, 1) - 1)
        write_kv(cache.k[0], cache.v[0], table, pos, torch.randn(B, H_kv, 1, D), torch.randn(B, H_kv, 1, D))
        update_page_minmax(cache.k[0], cache.kmin[0], cache.kmax[0], table, pos, torch.minimum(lengths, torch.tensor(t + 1)))
    window = torch.tensor([[30, 31, 32], [21, 22, 23]])  # overwrite the last w tokens of each sequence
    write_kv(cache.k[0], cache.v[0], table, window, torch.randn(B, H_kv, 3, D), torch.randn(B, H_kv, 3, D))
    update_page_minmax(cache.k[0], cache.kmin[0], cache.kmax[0], table, window, lengths)
    kmin = torch.full_like(cache.kmin[0], float("nan"))
    kmax = kmin.clone()
    every = torch.arange(0, cache.pages_per_seq * P, P).view(1, -1).expand(B, -1)  # one position per page
    positions = torch.where(every < lengths.view(B, 1), every, -1)
    update_page_minmax_ref(cache.k[0], kmin, kmax, table, positions, lengths)
    live_pages = torch.cat([table[b, : math.ceil(int(T) / P)].long() for b, T in enumerate(lengths)])
    assert torch.equal(kmin[live_pages], cache.kmin[0, live_pages]), f"seed {seed}"
    assert torch.equal(kmax[live_pages], cache.kmax[0, live_pages]), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_matches_reference_gpu(dtype) -> None:
    needs_kernel_device("cuda")
    positions = (tuple(range(4090, 4096)) + (-1, 17), tuple(range(3000, 3008)))
    check((8, 128, 16, (4096, 3008), positions), dtype, torch.int64, "cuda")
