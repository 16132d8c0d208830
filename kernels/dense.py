"""Dense causal attention of a prefill chunk over its sequence's prefix, output only (no LSE).

Why a separate op: a prompt attends every key before each query, and most methods need only the
output there (none merges prefill states). ``dense_attention_ref`` defines it through the sparse
reference over every page. ``dense_attention_sdpa`` gathers each sequence's prefix once and calls
PyTorch's ``scaled_dot_product_attention`` (fused kernels on CPU and GPU: no fp32 ``[S, T]`` score
matrix built op by op; a chunk whose queries are the last S of T positions in every row is
lower-right causal, run by the flash / memory-efficient kernels without a mask tensor); it is the
torch backend's ``dense_attention`` and, as ``prefill_attention_sdpa``, both backends'
``prefill_attention``, proven equal to the reference by tests. ``dense_attention`` is the Triton sparse-attention kernel over every page (its LSE dropped).
A method that needs the prefill LSE (InfLLM's representative scores, TOVA's last row) asks
``attend_dense(..., need_lse=True)``, which takes the sparse op.

Shapes (glossary in methods/base.py): ``q [B, H, S, D]``, ``k_cache``/``v_cache``
``[N_pages, P, H_kv, D]``, ``page_table [B, n_max]``, ``n_pages [B]``, ``q_pos [B, S]``, optionally
``pages [B, 1, n_max]`` (the every-page list, when the caller has it); returns
``[B, H, S, D]`` in ``q``'s dtype. A query at position p sees keys 0..p; one at -1 sees nothing
(output 0, as the reference).
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from retrobench.kernels.paged_attention import sparse_paged_attention, sparse_paged_attention_ref


def _every_page(n_pages: torch.Tensor, n_max: int, heads: int) -> torch.Tensor:
    idx = torch.arange(n_max, device=n_pages.device).view(1, 1, n_max)
    return torch.where(idx < n_pages.view(-1, 1, 1), idx, torch.full_like(idx, -1)).expand(-1, heads, -1)


def dense_attention_ref(q, k_cache, v_cache, page_table, n_pages, q_pos, scaling, pages=None) -> torch.Tensor:  # noqa: ANN001
    """Reference: the sparse reference over every page of the sequence (``pages`` unused)."""
    pages = _every_page(n_pages, page_table.shape[1], k_cache.shape[2])
    return sparse_paged_attention_ref(q, k_cache, v_cache, page_table, pages, q_pos, scaling, num_units=n_pages)[0]


def dense_attention(q, k_cache, v_cache, page_table, n_pages, q_pos, scaling, pages=None) -> torch.Tensor:  # noqa: ANN001
    """Triton: the sparse-attention kernel over every page (CUDA, or CPU under the interpreter).

    ``pages [B, 1, n_max]`` (optional): the every-page list when the caller built it once per
    forward (pages 0 .. n_pages-1, then -1); otherwise built here."""
    if pages is None:
        pages = _every_page(n_pages, page_table.shape[1], k_cache.shape[2])
    else:
        pages = pages.expand(-1, k_cache.shape[2], -1)
    # in order: a chunk's programs stop at their last query; a decode query sees every key anyway, and
    # the bound's q_pos reduce ahead of the first tile cost 4-10 % of full attention's decode step
    return sparse_paged_attention(q, k_cache, v_cache, page_table, pages, q_pos, scaling, num_units=n_pages,
                                  in_order=q.shape[2] > 1)[0]  # fmt: skip


def prefill_attention_sdpa(q, k_cache, v_cache, page_table, n_pages, q_pos, scaling) -> torch.Tensor:  # noqa: ANN001
    """Both backends' ``prefill_attention``: :func:`dense_attention_sdpa` with a chunk whose queries are
    the last S of T positions in every row run as lower-right causal attention (no mask tensor).
    Never under the engine's capture guard (a prefill), which cannot hold the ``CausalBias`` subclass."""
    return dense_attention_sdpa(q, k_cache, v_cache, page_table, n_pages, q_pos, scaling, lower_right=True)


def dense_attention_sdpa(q, k_cache, v_cache, page_table, n_pages, q_pos, scaling, pages=None,  # noqa: ANN001
                         lower_right=False) -> torch.Tensor:  # fmt: skip
    """PyTorch SDPA over each sequence's gathered prefix (reads positions 0..max(q_pos); may sync;
    ``pages`` unused; ``lower_right``: see :func:`prefill_attention_sdpa`)."""
    B, H, S, D = q.shape
    _, P, H_kv, _ = k_cache.shape
    T = max(1, int(q_pos.max()) + 1)
    n = -(-T // P)
    phys = page_table[:, :n].long()
    n_max = page_table.shape[1]
    rows = torch.arange(B, device=phys.device).view(B, 1) * n_max + torch.arange(n, device=phys.device)
    if torch.equal(phys, rows):  # the default layout: each sequence's pages in order, a view (no copy)
        k = k_cache.view(B, n_max * P, H_kv, D)[:, :T].transpose(1, 2)  # [B, H_kv, T, D]
        v = v_cache.view(B, n_max * P, H_kv, D)[:, :T].transpose(1, 2)
    else:
        k = k_cache[phys].reshape(B, n * P, H_kv, D)[:, :T].transpose(1, 2)
        v = v_cache[phys].reshape(B, n * P, H_kv, D)[:, :T].transpose(1, 2)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if S == 1 and not lower_right:  # a decode query: see _decode_sdpa
        return _decode_sdpa(q, k, v, q_pos, scaling, T)
    if lower_right and S > 1 and torch.equal(q_pos, torch.arange(T - S, T, device=q_pos.device).expand(B, S)):
        # every row's queries are the last S of its T keys (a prefill chunk): lower-right causal,
        # which PyTorch runs as flash / memory-efficient attention without a mask tensor
        mask = causal_lower_right(S, T)
    else:
        mask = torch.arange(T, device=q.device).view(1, 1, 1, T) <= q_pos.long().view(B, 1, S, 1)
    try:  # GQA without copying K/V (torch >= 2.5)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    except TypeError:
        if H != H_kv:  # each KV head serves H / H_kv query heads
            k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    blind = (q_pos < 0).view(B, 1, S, 1)
    return torch.where(blind, torch.zeros_like(out), out) if bool(blind.any()) else out


def _decode_sdpa(q, k, v, q_pos, scaling, T: int) -> torch.Tensor:  # noqa: ANN001
    """One query a sequence (``q [B, H, 1, D]``, ``k, v [B, H_kv, T, D]``): the G query heads of each
    KV head go in as G query rows of that head, so SDPA reads each KV head's keys once instead of once
    per query head (on CPU, where the decode step reads K/V from memory, 10-15 % faster a call than
    ``enable_gqa``); no mask when every sequence's query is its last position (batch 1 always)."""
    B, H, _, D = q.shape
    H_kv = k.shape[1]
    last = q_pos.view(B) == T - 1
    mask = None if bool(last.all()) else (torch.arange(T, device=q.device).view(1, T) <= q_pos.long().view(B, 1))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B, H_kv, H // H_kv, D), k, v, attn_mask=None if mask is None else mask.view(B, 1, 1, T), scale=scaling
    ).reshape(B, H, 1, D)
    blind = q_pos.view(B, 1, 1, 1) < 0
    return torch.where(blind, torch.zeros_like(out), out) if mask is not None and bool(blind.any()) else out


__all__ = ["dense_attention", "dense_attention_ref", "dense_attention_sdpa", "prefill_attention_sdpa"]
