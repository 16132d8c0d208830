"""paged_logits (Triton) equals its reference (gathered keys, fp32 products) on random paged caches,
and write_kv (Triton) equals write_kv_ref: odd head dims, GQA 1/3/4, permuted page tables, padding
(-1) positions in any slot (the kernel skips them), strided sources, more tokens than one program
writes, fp32/fp16 on CPU under the interpreter, bf16 on the GPU. Outputs poisoned."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from retrobench.kernels._testing import assert_close, fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.kv_write import write_kv, write_kv_ref
from retrobench.kernels.scores import paged_logits, paged_logits_ref

TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}



def make(B, H, H_kv, D, P, T, n_tok, dtype, device="cpu"):
    n_max = -(-T // P)
    pool = B * n_max + 3
    k_cache = torch.randn(pool, P, H_kv, D)
    table = torch.randperm(pool)[: B * n_max].view(B, n_max).to(torch.int32)
    tokens = torch.randint(0, T, (B, n_tok))
    tokens[torch.rand(B, n_tok) < 0.2] = -1  # padding anywhere
    q = torch.randn(B, H, D)
    to = {"device": device}
    return q.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to), table.to(**to), tokens.to(**to)


CASES = {"g1-d24": (2, 2, 2, 24, 4, 37, 50), "g3-d40": (2, 6, 2, 40, 8, 70, 130), "g4-d16-p1": (1, 8, 2, 16, 1, 33, 33)}


def check(shape, dtype, device) -> None:
    seed = fresh_seed()
    q, k_cache, table, tokens = make(*shape, dtype, device)
    want = paged_logits_ref(q, k_cache, table, tokens, 0.3)
    with poisoned_empty():
        got = paged_logits(q, k_cache, table, tokens, 0.3)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert_close("logits", got, want, *TOL[dtype], seed=seed)
    assert torch.isneginf(got[tokens.unsqueeze(1).expand_as(got) < 0]).all(), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name, dtype) -> None:
    needs_kernel_device("cpu")
    check(CASES[name], dtype, "cpu")


KV_CASES = {
    # name: (B, H_kv, S, D, P, n_max, padded) ; padded: some rows end in -1 positions
    "decode": (3, 2, 1, 8, 4, 6, False),
    "window-gqa3-odd-d": (2, 3, 5, 24, 4, 6, True),
    "prefill-multi-block": (2, 2, 37, 16, 8, 6, True),  # more tokens than one program's block
}


def check_write_kv(case, dtype, device) -> None:
    seed = fresh_seed()
    B, H_kv, S, D, P, n_max, padded = case
    table = torch.randperm(B * n_max + 2)[: B * n_max].view(B, n_max).to(torch.int32).to(device)
    positions = torch.stack([torch.randperm(n_max * P)[:S] for _ in range(B)]).to(device)
    if padded:
        positions[0, -2:] = -1  # padding: skipped by the kernel, never given to the reference
    k = torch.randn(B, S, H_kv, D, device=device).transpose(1, 2)  # the projection's strided head-split view
    v = torch.randn(B, H_kv, S, D, device=device)
    caches = [torch.randn(B * n_max + 2, P, H_kv, D, device=device).to(dtype) for _ in range(2)]
    ref = [c.clone() for c in caches]
    write_kv(*caches, table, positions, k, v)
    for b in range(B):
        keep = positions[b] >= 0
        write_kv_ref(*ref, table[b : b + 1], positions[b : b + 1, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep])
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1]), f"seed {seed}"
    valid = positions.clamp(min=0)
    slots = table.long().gather(1, valid // P) * P + valid % P  # precomputed flat slots: the same
    again = [torch.randn_like(c) for c in caches]
    ref2 = [c.clone() for c in again]
    write_kv(*again, table, positions, k, v, slots=slots)
    for b in range(B):
        keep = positions[b] >= 0
        write_kv_ref(*ref2, table[b : b + 1], positions[b : b + 1, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep])
    assert torch.equal(again[0], ref2[0]) and torch.equal(again[1], ref2[1]), f"seed {seed}"
    for s, t in enumerate(positions[1].tolist()):
        assert torch.equal(caches[0][table[1, t // P], t % P], k[1, :, s].to(dtype)), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(KV_CASES))
def test_write_kv_matches_reference(name, dtype) -> None:
    needs_kernel_device("cpu")
    check_write_kv(KV_CASES[name], dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 3, 4099])
def test_write_kv_matches_reference_gpu(S) -> None:
    needs_kernel_device("cuda")
    check_write_kv((2, 8, S, 128, 16, 300, True), torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_logits_match_reference_gpu(dtype) -> None:
    needs_kernel_device("cuda")
    check((2, 32, 8, 128, 16, 4096, 4096), dtype, "cuda")
