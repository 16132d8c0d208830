"""merge_states (Triton) equals merge_states_ref, including empty sides (-inf), and merging the
attention over two disjoint page sets gives the attention over their union. Fresh seed per test."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from retrobench.kernels._testing import assert_close, fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.merge import merge_states, merge_states_ref

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}



def check(shape, dtype, device) -> None:
    seed = fresh_seed()
    *rows, D = shape
    out_a = torch.randn(shape).to(dtype=dtype, device=device)
    out_b = torch.randn(shape).to(dtype=dtype, device=device)
    lse_a = (torch.randn(rows) * 4).to(device)
    lse_b = (torch.randn(rows) * 4).to(device)
    flat_a, flat_b = lse_a.view(-1), lse_b.view(-1)
    flat_a[0::4] = float("-inf")  # a empty
    flat_b[1::4] = float("-inf")  # b empty
    flat_a[2::5], flat_b[2::5] = float("-inf"), float("-inf")  # both empty
    for side, flat in ((out_a, flat_a), (out_b, flat_b)):  # an empty side's output is 0, as the kernels write it
        side.view(-1, D)[flat == float("-inf")] = 0
    expected = merge_states_ref(out_a, lse_a, out_b, lse_b)
    with poisoned_empty():
        out, lse = merge_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == out_a.shape
    assert_close("lse", lse, expected[1], 1e-5, 1e-5, seed=seed)
    assert_close("out", out, expected[0], *TOL[dtype], seed=seed)
    both = (flat_a == float("-inf")) & (flat_b == float("-inf"))
    assert torch.all(lse.view(-1)[both] == float("-inf")) and torch.all(out.view(-1, D)[both] == 0), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(2, 6, 3, 24), (1, 5, 1, 40), (37, 64)], ids=["bhsd-d24", "bhsd-d40", "rows37-d64"])
def test_matches_reference(shape, dtype) -> None:
    needs_kernel_device("cpu")
    check(shape, dtype, "cpu")


def test_merge_of_disjoint_page_sets_is_attention_over_the_union() -> None:
    """Split a selection between two calls of the attention kernel; the merge equals one call."""
    needs_kernel_device("cpu")
    from retrobench.kernels.paged_attention import sparse_paged_attention

    seed = fresh_seed()
    B, H, H_kv, S, D, P, n = 1, 4, 2, 3, 24, 4, 9
    k_cache, v_cache = torch.randn(n + 2, P, H_kv, D), torch.randn(n + 2, P, H_kv, D)
    page_table = torch.randperm(n + 2)[:n].view(1, n).to(torch.int32)
    q = torch.randn(B, H, S, D)
    q_pos = torch.tensor([[30, 33, 35]], dtype=torch.int32)
    order = torch.stack([torch.randperm(n) for _ in range(H_kv)]).view(1, H_kv, n).to(torch.int32)
    first, second = order[..., :4].contiguous(), order[..., 4:].contiguous()
    whole = sparse_paged_attention(q, k_cache, v_cache, page_table, order, q_pos, D**-0.5)
    a = sparse_paged_attention(q, k_cache, v_cache, page_table, first, q_pos, D**-0.5)
    b = sparse_paged_attention(q, k_cache, v_cache, page_table, second, q_pos, D**-0.5)
    out, lse = merge_states(a[0], a[1], b[0], b[1])
    assert_close("lse", lse, whole[1], 1e-5, 1e-5, seed=seed)
    assert_close("out", out, whole[0], 1e-5, 1e-5, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_matches_reference_gpu(dtype) -> None:
    needs_kernel_device("cuda")
    check((8, 32, 3, 128), dtype, "cuda")
