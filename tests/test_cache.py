"""Paged KV cache invariants: page min/max equal a brute-force recomputation after any sequence of
appends, overwrites and evictions; page tables map every position; sequences never mix."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retrobench.engine.cache import PagedKVCache

L, H_KV, D = 2, 2, 3


def brute_force_meta(cache: PagedKVCache, truth: dict, layer: int, b: int):
    """Min/max per logical page over the live positions, from the reference copy of what was written."""
    P = cache.page_size
    n = cache.num_pages(b)
    kmin = torch.full((n, H_KV, D), float("inf"))
    kmax = torch.full((n, H_KV, D), float("-inf"))
    for pos, (k, _) in truth[(layer, b)].items():
        if pos < int(cache.lengths[b]) and bool(cache.live[layer, b, pos]):
            kmin[pos // P] = torch.minimum(kmin[pos // P], k)
            kmax[pos // P] = torch.maximum(kmax[pos // P], k)
    return kmin, kmax


op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 1), st.integers(1, 9)),
    st.tuples(st.just("overwrite"), st.integers(0, 1), st.integers(1, 4)),
    st.tuples(st.just("evict"), st.integers(0, 1), st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(op, min_size=1, max_size=12),
    page_size=st.sampled_from([1, 2, 4, 8]),
    permute=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_meta_exact_after_appends_overwrites_evictions(ops, page_size, permute, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(L, H_KV, D, page_size, max_tokens=64, batch_size=2)
    if permute:  # any page table must work, not only the contiguous default
        perm = torch.randperm(cache.page_table.numel(), generator=gen)
        cache.remap(perm.view_as(cache.page_table))
    truth = {(layer, b): {} for layer in range(L) for b in range(2)}
    for kind, b, n in ops:
        length = int(cache.lengths[b])
        if kind == "append":
            n = min(n, 64 - length)
            if n == 0:
                continue
            pos = torch.arange(length, length + n)
        elif kind == "overwrite":
            if length == 0:
                continue
            pos = torch.randperm(length, generator=gen)[:n].sort().values
        else:
            if length == 0:
                continue
            layers = [int(torch.randint(0, L, (1,), generator=gen))] if n % 2 else None  # one layer or all
            cache.evict(b, torch.randperm(length, generator=gen)[:n], layers)
            continue
        seqs = torch.tensor([b])
        cache.reserve(pos.view(1, -1), seqs)
        for layer in range(L):
            k = torch.randn(1, H_KV, pos.numel(), D, generator=gen)
            v = torch.randn(1, H_KV, pos.numel(), D, generator=gen)
            cache.write(layer, pos.view(1, -1), k, v, seqs)
            for i, p in enumerate(pos.tolist()):
                truth[(layer, b)][p] = (k[0, :, i], v[0, :, i])
    for layer in range(L):
        for b in range(2):
            length = int(cache.lengths[b])
            if length == 0:
                continue
            kmin, kmax = cache.page_meta(layer, b)
            ref_min, ref_max = brute_force_meta(cache, truth, layer, b)
            assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
            keys, values = cache.keys(layer, b), cache.values(layer, b)
            assert keys.shape == (length, H_KV, D)
            for p, (k, v) in truth[(layer, b)].items():  # the page table maps every position
                assert torch.equal(keys[p], k) and torch.equal(values[p], v)


def test_sequences_do_not_mix():
    cache = PagedKVCache(1, 1, 2, 4, max_tokens=10, batch_size=2)
    pos = torch.arange(6).expand(2, -1)
    cache.reserve(pos)
    k = torch.stack([torch.zeros(1, 6, 2), torch.ones(1, 6, 2)])
    cache.write(0, pos, k, k)
    assert torch.equal(cache.keys(0, 0), torch.zeros(6, 1, 2))
    assert torch.equal(cache.keys(0, 1), torch.ones(6, 1, 2))
    assert cache.resident_tokens().tolist() == [6, 6]
    cache.evict(1, torch.tensor([0, 5]))
    assert cache.resident_tokens().tolist() == [6, 4]
    cache.evict(0, torch.tensor([1]), layers=[0])  # per-layer eviction (TOVA)
    assert cache.live_mask(0, 0).tolist() == [True, False, True, True, True, True]


def test_reserve_beyond_capacity_is_an_error():
    cache = PagedKVCache(1, 1, 2, 4, max_tokens=5)
    try:
        cache.reserve(torch.tensor([[5]]))
    except ValueError as err:
        assert "capacity" in str(err)
    else:
        raise AssertionError("expected ValueError")
