"""Paged KV cache invariants: after any sequence of appends and overwrites (through the kernel ops'
write and min/max refresh), page min/max equal a brute-force recomputation, the page table maps
every position, sequences never mix, and the token view addresses the same bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retrobench.engine.cache import LAYOUTS, PagedKVCache
from retrobench.kernels.ops import TORCH_OPS

L, H_KV, D = 2, 2, 3


def brute_force_meta(truth: dict, length: int, P: int, layer: int, b: int):
    """Min/max per logical page over the written positions below the length."""
    n = -(-length // P)
    kmin = torch.full((n, H_KV, D), float("inf"))
    kmax = torch.full((n, H_KV, D), float("-inf"))
    for pos, (k, _) in truth[(layer, b)].items():
        if pos < length:
            kmin[pos // P] = torch.minimum(kmin[pos // P], k)
            kmax[pos // P] = torch.maximum(kmax[pos // P], k)
    return kmin, kmax


op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 1), st.integers(1, 9)),
    st.tuples(st.just("overwrite"), st.integers(0, 1), st.integers(1, 4)),
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(op, min_size=1, max_size=12),
    page_size=st.sampled_from([1, 2, 4, 8]),
    permute=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_meta_exact_after_appends_and_overwrites(ops, page_size, permute, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(L, H_KV, D, page_size, max_tokens=64, batch_size=2, layout=layout)
    if permute:  # any page table must work, not only the contiguous default
        perm = torch.randperm(cache.page_table.numel(), generator=gen)
        cache.remap(perm.view_as(cache.page_table))
    truth = {(layer, b): {} for layer in range(L) for b in range(2)}
    lengths = [0, 0]
    for kind, b, n in ops:
        if kind == "append":
            n = min(n, 64 - lengths[b])
            if n == 0:
                continue
            pos = torch.arange(lengths[b], lengths[b] + n)
            lengths[b] += n
        else:
            if lengths[b] == 0:
                continue
            pos = torch.randperm(lengths[b], generator=gen)[:n].sort().values
        for layer in range(L):
            k = torch.randn(1, H_KV, pos.numel(), D, generator=gen)
            v = torch.randn(1, H_KV, pos.numel(), D, generator=gen)
            positions = pos.view(1, -1)
            table = cache.page_table[b : b + 1]
            TORCH_OPS.write_kv(cache.k[layer], cache.v[layer], table, positions, k, v)
            TORCH_OPS.update_page_minmax(
                cache.k[layer], cache.kmin[layer], cache.kmax[layer], table, positions, torch.tensor([lengths[b]])
            )
            for i, p in enumerate(pos.tolist()):
                truth[(layer, b)][p] = (k[0, :, i], v[0, :, i])
    for layer in range(L):
        for b in range(2):
            if lengths[b] == 0:
                continue
            kmin, kmax = cache.page_meta(layer, b, lengths[b])
            ref_min, ref_max = brute_force_meta(truth, lengths[b], page_size, layer, b)
            assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
            keys, values = cache.keys(layer, b, lengths[b]), cache.values(layer, b, lengths[b])
            assert keys.shape == (lengths[b], H_KV, D)
            for p, (k, v) in truth[(layer, b)].items():  # the page table maps every position
                assert torch.equal(keys[p], k) and torch.equal(values[p], v)
            pos = torch.arange(lengths[b])
            assert torch.equal(cache.gather_keys(b, pos, slice(layer, layer + 1))[0], keys)
            tk, _, table = cache.token_view(layer)  # one-token units address the same bytes
            assert torch.equal(tk[table[b, : lengths[b]].long(), 0], keys)


def test_sequences_do_not_mix():
    cache = PagedKVCache(1, 1, 2, 4, max_tokens=10, batch_size=2)
    pos = torch.arange(6).expand(2, -1)
    k = torch.stack([torch.zeros(1, 6, 2), torch.ones(1, 6, 2)])
    TORCH_OPS.write_kv(cache.k[0], cache.v[0], cache.page_table, pos, k, k)
    assert torch.equal(cache.keys(0, 0, 6), torch.zeros(6, 1, 2))
    assert torch.equal(cache.keys(0, 1, 6), torch.ones(6, 1, 2))
    assert torch.equal(cache.gather_keys_batch(0, torch.arange(6)), k.transpose(1, 2))
    assert cache.capacity == 12 and cache.bytes_per_token() == 2 * 1 * 1 * 2 * 4


def test_caches_without_page_meta_say_so():
    cache = PagedKVCache(1, 1, 2, 4, max_tokens=10, page_meta=False)
    assert cache.kmin is None
    try:
        cache.page_meta(0, 0, 4)
    except ValueError as err:
        assert "min/max" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_layouts_hold_the_same_pages() -> None:
    """Both storage orders expose ``[L, N, P, H_kv, D]``; the head-major one (the CPU default) keeps a
    sequence's keys of one head as one contiguous ``[T, D]`` block; writes land in the same places."""
    B, P, T = 2, 4, 22
    assert PagedKVCache(L, H_KV, D, P, T, B).layout == "head"
    caches = {name: PagedKVCache(L, H_KV, D, P, T, B, layout=name) for name in LAYOUTS}
    k, v = torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D)
    pos = torch.arange(T).expand(B, -1)
    for cache in caches.values():
        assert tuple(cache.k.shape) == (L, B * cache.pages_per_seq, P, H_KV, D)
        TORCH_OPS.write_kv(cache.k[1], cache.v[1], cache.page_table, pos, k, v)
    token, head = caches["token"], caches["head"]
    assert token.k.is_contiguous() and not head.k.is_contiguous()
    assert torch.equal(token.k, head.k) and torch.equal(token.v, head.v)
    per_head = head.k[1].view(B, -1, H_KV, D)[:, :T].transpose(1, 2)  # [B, H_kv, T, D], a view
    assert per_head[0, 1].is_contiguous() and torch.equal(per_head, k)
    with pytest.raises(ValueError, match="allowed: token, head"):
        PagedKVCache(L, H_KV, D, P, T, B, layout="rows")
