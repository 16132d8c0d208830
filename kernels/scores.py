"""Scaled attention logits of one query per sequence over a list of key positions in the paged cache.

The methods that rank or evict by true attention need the current query's logits over many keys:
the oracle over every key (its softmax mass decides the selection), TOVA over every live key (the
lowest head-averaged weight is evicted) and InfLLM over its local window (the probability each key
draws there builds the block representatives). ``paged_logits`` computes
``scaling * q_h · k_t`` for the listed positions t, straight from the paged cache: one program per
(sequence, KV head, block of positions) loads each key once for the G query heads of its group.
Softmax, masking and reductions stay with the caller (tensor ops). Padding positions (-1) get -inf.

The reference :func:`paged_logits_ref` gathers the keys and takes the products in fp32.
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, SUM, next_pow2, require_triton, tl, triton

BLOCK_T = 64

if HAS_TRITON:

    @triton.jit
    def _paged_logits_kernel(
        Q, Kc, PageTable, Tokens, Out, scaling,
        stride_qb, stride_qh,
        stride_kn, stride_kp, stride_kh,
        stride_ptb, stride_tb, stride_ob, stride_oh,
        H_KV, D, T,
        G: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_bk = tl.program_id(0)
        b = pid_bk // H_KV
        kv = pid_bk % H_KV
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        t = tl.load(Tokens + b * stride_tb + i, mask=i < T, other=-1).to(tl.int64)
        ok = t >= 0
        page = tl.where(ok, t // P, 0)
        phys = tl.load(PageTable + b * stride_ptb + page, mask=ok, other=0).to(tl.int64)
        k = tl.load(Kc + phys[:, None] * stride_kn + (t % P)[:, None] * stride_kp + kv * stride_kh + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        for gi in tl.static_range(G):
            h = kv * G + gi
            qg = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
            logit = tl.reduce(qg[None, :] * k, 1, SUM) * scaling
            tl.store(Out + b * stride_ob + h * stride_oh + i, tl.where(ok, logit, float("-inf")), mask=i < T)


def _check(q, k_cache, page_table, tokens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q must be [B, H, D] over k_cache [N, P, H_kv, D]; got {tuple(q.shape)}, {tuple(k_cache.shape)}")
    B = q.shape[0]
    if page_table.dim() != 2 or page_table.shape[0] != B or tokens.dim() != 2 or tokens.shape[0] != B:
        raise ValueError("page_table must be [B, n_max] and tokens [B, T]")


def paged_logits(
    q: torch.Tensor, k_cache: torch.Tensor, page_table: torch.Tensor, tokens: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``scaling * q · k`` of each query head over the listed key positions (Triton).

    Parameters
    ----------
    q : ``[B, H, D]`` one query per sequence. k_cache : ``[N_pages, P, H_kv, D]`` (one layer).
    page_table : ``[B, n_max]`` int. tokens : ``[B, T]`` int key positions, -1 = padding.

    Returns
    -------
    ``[B, H, T]`` fp32 logits; -inf at padding. No host synchronisation.
    """
    _check(q, k_cache, page_table, tokens)
    require_triton(q, "paged_logits")
    B, H, D = q.shape
    _, P, H_kv, _ = k_cache.shape
    T = tokens.shape[1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or tokens.stride(-1) != 1:
        raise ValueError("q, k_cache and tokens must be contiguous in their last dimension")
    out = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out
    _paged_logits_kernel[(B * H_kv, triton.cdiv(T, BLOCK_T))](
        q, k_cache, page_table, tokens, out, float(scaling),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        page_table.stride(0), tokens.stride(0), out.stride(0), out.stride(1),
        H_kv, D, T,
        G=H // H_kv, P=P, BLOCK=BLOCK_T, BLOCK_D=next_pow2(D), num_warps=4,
    )  # fmt: skip
    return out


def paged_logits_ref(
    q: torch.Tensor, k_cache: torch.Tensor, page_table: torch.Tensor, tokens: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Reference: gather the keys of the listed positions and take the scaled products in fp32."""
    _check(q, k_cache, page_table, tokens)
    B, H, D = q.shape
    P, H_kv = k_cache.shape[1], k_cache.shape[2]
    t = tokens.long()
    ok = t >= 0
    t = torch.where(ok, t, torch.zeros_like(t))
    phys = torch.gather(page_table.long(), 1, t // P)  # [B, T]
    keys = k_cache[phys, t % P].float().repeat_interleave(H // H_kv, dim=2)  # [B, T, H, D]
    logits = torch.einsum("bhd,bthd->bht", q.float(), keys) * scaling
    return logits.masked_fill(~ok.unsqueeze(1), float("-inf"))
