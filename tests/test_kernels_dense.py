"""dense_attention (prefill, output only): the SDPA version (torch backend) and the Triton one equal
the reference (the sparse reference over every page), for GQA and MHA, partial last pages, a
remapped page table, rows at different positions and a query that sees nothing; and a prefill
through the dense op equals the old prefill (the sparse op over every page) for every method:
logits, cache and greedy tokens. Fresh seed per test."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from harness import METHOD_CASES, make_case, random_prompt

from retrobench.engine import Engine
from retrobench.engine.cache import PagedKVCache
from retrobench.kernels._testing import assert_close, fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.dense import dense_attention, dense_attention_ref, dense_attention_sdpa, prefill_attention_sdpa
from retrobench.kernels.ops import TORCH_OPS

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
SHAPES = [  # (B, H, H_kv, D, P, T, S)
    (2, 6, 2, 16, 8, 45, 13),
    (1, 4, 4, 32, 16, 64, 64),
    (3, 9, 3, 8, 4, 7, 1),  # decode rows at different ends, one blind: the masked single-query path
    (1, 8, 2, 16, 16, 37, 1),  # batch-1 decode: the single-query path without a mask
    (1, 4, 4, 32, 8, 50, 1),  # ... MHA
]


def _case(B, H, H_kv, D, P, T, S, dtype, device, remap=True):
    cache = PagedKVCache(1, H_kv, D, P, T + P, B, dtype, device, page_meta=False)
    if remap:  # every read goes through the table (else the default layout: the SDPA op reads a view)
        cache.remap(torch.randperm(cache.page_table.numel()).view_as(cache.page_table))
    cache.k.normal_()
    cache.v.normal_()
    ends = torch.tensor([T - 2 * b for b in range(B)])  # rows end at different positions
    q_pos = torch.stack([torch.arange(e - S, e) for e in ends.tolist()]).to(device)
    if B > 1:
        q_pos[-1, 0] = -1  # a query that sees nothing
        q_pos[-1] = torch.sort(q_pos[-1]).values
    n_pages = ((ends + P - 1) // P).to(device)
    q = torch.randn(B, H, S, D).to(dtype=dtype, device=device)
    return q, cache, n_pages, q_pos


@pytest.mark.parametrize("remap", [True, False], ids=["remapped", "default-layout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_equals_reference(shape, dtype, remap) -> None:
    seed = fresh_seed()
    q, cache, n_pages, q_pos = _case(*shape, dtype, "cpu", remap)
    args = (q, cache.k[0], cache.v[0], cache.page_table, n_pages, q_pos, shape[3] ** -0.5)
    expected = dense_attention_ref(*args)
    out = dense_attention_sdpa(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close("out", out, expected, *TOL[dtype], seed=seed)
    assert torch.all(out[q_pos.view(q.shape[0], 1, -1).expand(-1, q.shape[1], -1) < 0] == 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 6, 2, 16, 8, 45, 13), (1, 8, 2, 64, 16, 300, 300), (2, 4, 1, 128, 16, 200, 64)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_sdpa_prefill_chunk_equals_reference(shape, dtype, device) -> None:
    """Every row's queries are the last S of its T keys (a prefill chunk): the lower-right causal
    path (flash / memory-efficient attention on a GPU) against the reference."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    seed = fresh_seed()
    B, H, H_kv, D, P, T, S = shape
    cache = PagedKVCache(1, H_kv, D, P, T + P, B, dtype, device, page_meta=False)
    cache.k.normal_()
    cache.v.normal_()
    q_pos = torch.arange(T - S, T, device=device).expand(B, S).contiguous()
    n_pages = torch.full((B,), -(-T // P), device=device)
    q = torch.randn(B, H, S, D, device=device).to(dtype)
    args = (q, cache.k[0], cache.v[0], cache.page_table, n_pages, q_pos, D**-0.5)
    tol = TOL[dtype] if device == "cpu" else {torch.float32: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert_close("out", prefill_attention_sdpa(*args), dense_attention_ref(*args), *tol, seed=seed)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_triton_equals_reference(shape, device) -> None:
    needs_kernel_device(device)
    seed = fresh_seed()
    q, cache, n_pages, q_pos = _case(*shape, torch.float32, device)
    args = (q, cache.k[0], cache.v[0], cache.page_table, n_pages, q_pos, shape[3] ** -0.5)
    expected = dense_attention_ref(*args)
    n_max = cache.page_table.shape[1]
    idx = torch.arange(n_max, device=device).view(1, 1, n_max)
    every = torch.where(idx < n_pages.view(-1, 1, 1), idx, torch.full_like(idx, -1))  # as Forward.all_pages()
    with poisoned_empty():
        out = dense_attention(*args)
        given = dense_attention(*args, pages=every)
    assert_close("out", out, expected, *TOL[torch.float32], seed=seed)
    assert_close("out with the caller's page list", given, expected, *TOL[torch.float32], seed=seed)


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_prefill_through_the_dense_op_equals_the_old_prefill(tiny_random, name: str) -> None:
    """The old prefill ran the sparse reference over every page; the new one the fused dense op."""
    model, _ = tiny_random
    prompt = random_prompt(77, model.config.vocab_size, 7)  # 3 chunks of 32, the last partial
    runs = {}
    old = dataclasses.replace(TORCH_OPS, dense_attention=dense_attention_ref, prefill_attention=dense_attention_ref)
    for label, ops in (("new", TORCH_OPS), ("old", old)):
        engine = Engine(model, make_case(name), page_size=8, prefill_chunk=32)
        engine.ops = ops
        request = engine.new_request(len(prompt) + 8)
        logits = engine.prefill(request, torch.tensor([prompt]))
        gen = engine.generate(prompt, 8, keep_logits=True)
        runs[label] = (logits, request.cache, gen)
    (l_new, c_new, g_new), (l_old, c_old, g_old) = runs["new"], runs["old"]
    scale = float(l_old.abs().max())
    torch.testing.assert_close(l_new, l_old, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(c_new.k, c_old.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_new.v, c_old.v, rtol=1e-5, atol=1e-5)
    assert g_new.tokens == g_old.tokens
    torch.testing.assert_close(g_new.logits, g_old.logits, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("splits", [1, 3])
def test_in_order_lists_stop_at_the_last_query(device, splits: int) -> None:
    """``in_order=True`` (every page in order: a causal prefill, with the LSE InfLLM and TOVA need)
    stops each program at its rows' last query position: the same output and LSE as walking every
    key and as the reference, for row blocks ending anywhere, splits wholly past their last query,
    and a query that sees nothing (poisoned buffers)."""
    from retrobench.kernels.paged_attention import sparse_paged_attention, sparse_paged_attention_ref

    needs_kernel_device(device)
    seed = fresh_seed()
    B, H, H_kv, D, P, T, S = 2, 4, 2, 16, 8, 150, 70  # 2 x 70 rows a KV head: three row blocks
    q, cache, n_pages, q_pos = _case(B, H, H_kv, D, P, T, S, torch.float32, device)
    n_max = cache.page_table.shape[1]
    idx = torch.arange(n_max, device=device).view(1, 1, n_max)
    every = torch.where(idx < n_pages.view(-1, 1, 1), idx, torch.full_like(idx, -1)).expand(-1, H_kv, -1)
    args = (q, cache.k[0], cache.v[0], cache.page_table, every, q_pos, D**-0.5)
    ref_out, ref_lse = sparse_paged_attention_ref(*args, num_units=n_pages)
    for in_order in (False, True):
        with poisoned_empty():
            out, lse = sparse_paged_attention(*args, num_units=n_pages, num_splits=splits, in_order=in_order)
        assert_close(f"out (in_order={in_order})", out, ref_out, *TOL[torch.float32], seed=seed)
        assert_close(f"lse (in_order={in_order})", lse, ref_lse, *TOL[torch.float32], seed=seed)
