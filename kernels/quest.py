"""Quest page scores on device: the per-page upper bound of ``q·k`` from the cached key min/max.

Quest (Tang et al., ICML 2024) scores page p for query head h by
``Σ_i max(q_i·kmax_i, q_i·kmin_i)``, an upper bound of ``q·k`` over the page's keys, from the
per-page, per-KV-head channel min/max the cache keeps exact. ``quest_page_scores`` computes it for
every page of every sequence in one launch, reading each page's min/max once per KV head for the
G query heads of the group, and reduces over heads on the fly (``group_reduce``: the GQA policy,
``kv_head`` sums a group's heads, ``q_head`` keeps every head, ``layer`` sums all heads).
The top-k that follows is :func:`retrobench.kernels.topk.topk_forced`.

The reference :func:`quest_page_scores_ref` is the definition, written out in plain tensor ops.
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, MAX, SUM, dot_precision, next_pow2, require_triton, tl, triton

GROUP_REDUCES = ("kv_head", "q_head", "layer")
# the bound as two matrix products, 64 pages and 2 warps a program: within 10 % of the best setting
# at every shape of `bench kernels` on the H200 (512-8192 pages, batch 1 and 8), 1.2-1.4x faster
# than the elementwise bound at 16 pages x 2 warps from 2048 pages up (results/bench/kernels.md)
BLOCK_PAGES = 64
SCORE_WARPS = 2
USE_DOT = True

if HAS_TRITON:

    @triton.jit
    def _quest_page_scores_kernel(
        Q, Kmin, Kmax, PageTable, NPages, Scores,
        stride_qb, stride_qh,
        stride_mn, stride_mh, stride_xn, stride_xh,
        stride_ptb, stride_sb, stride_sh,
        H_KV, D, n_max,
        G: tl.constexpr, SUM_GROUP: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, KV head, block of pages): scores ``[G, BLOCK_P]`` or their group sum.

        ``USE_DOT``: the bound as two matrix products, ``kmax · max(q, 0) + kmin · min(q, 0)`` over the
        G heads at once (``max(q·hi, q·lo)`` per channel is ``q·hi`` where q > 0, else ``q·lo``). An empty
        page (kmin = +inf, kmax = -inf) then scores NaN (``0 · inf`` in every channel) and a page with
        any kmin channel at +inf scores NaN or -inf: both become -inf, as the reference's ``any(kmin ==
        inf)``. Otherwise the bound per head as elementwise products and a row sum."""
        pid_bk = tl.program_id(0)
        b = pid_bk // H_KV
        kv = pid_bk % H_KV
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        n_pages = tl.load(NPages + b)
        p_ok = (p < n_max) & (p < n_pages)
        phys = tl.load(PageTable + b * stride_ptb + p, mask=p_ok, other=0).to(tl.int64)
        m2 = p_ok[:, None] & d_ok[None, :]
        lo = tl.load(Kmin + phys[:, None] * stride_mn + kv * stride_mh + d[None, :], mask=m2, other=0.0)
        hi = tl.load(Kmax + phys[:, None] * stride_xn + kv * stride_xh + d[None, :], mask=m2, other=0.0)
        if USE_DOT:
            g = tl.arange(0, BLOCK_G)
            q = tl.load(Q + b * stride_qb + (kv * G + g[:, None]) * stride_qh + d[None, :],
                        mask=(g[:, None] < G) & d_ok[None, :], other=0.0).to(lo.dtype)  # fmt: skip
            q_pos = tl.where(q > 0, q, 0.0).to(lo.dtype)  # exact: the same values in the same dtype
            q_neg = tl.where(q < 0, q, 0.0).to(lo.dtype)
            bound = tl.dot(hi, tl.trans(q_pos), input_precision=DOT_PRECISION)
            bound = tl.dot(lo, tl.trans(q_neg), bound, input_precision=DOT_PRECISION)  # [BLOCK_P, BLOCK_G]
            keep = p_ok[:, None] & (bound == bound) & (bound > float("-inf"))
            bound = tl.where(keep, bound, float("-inf"))
            if SUM_GROUP:
                total = tl.reduce(tl.where(g[None, :] < G, bound, 0.0), 1, SUM)
                tl.store(Scores + b * stride_sb + kv * stride_sh + p, total, mask=p < n_max)
            else:
                tl.store(Scores + b * stride_sb + (kv * G + g[None, :]) * stride_sh + p[:, None], bound,
                         mask=(p[:, None] < n_max) & (g[None, :] < G))  # fmt: skip
        else:
            lo = lo.to(tl.float32)
            hi = hi.to(tl.float32)
            empty = tl.reduce(tl.where(lo == float("inf"), 1, 0), 1, MAX) > 0  # an empty page holds kmin = +inf
            live = p_ok & (~empty)
            total = tl.zeros([BLOCK_P], tl.float32)
            for gi in tl.static_range(G):
                qg = tl.load(Q + b * stride_qb + (kv * G + gi) * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
                score = tl.reduce(tl.maximum(qg[None, :] * hi, qg[None, :] * lo), 1, SUM)
                score = tl.where(live, score, float("-inf"))
                if SUM_GROUP:
                    total += score
                else:
                    tl.store(Scores + b * stride_sb + (kv * G + gi) * stride_sh + p, score, mask=p < n_max)
            if SUM_GROUP:
                tl.store(Scores + b * stride_sb + kv * stride_sh + p, total, mask=p < n_max)


def _check_scores(q, kmin, kmax, page_table, n_pages, group_reduce) -> None:
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce={group_reduce!r}; allowed: {', '.join(GROUP_REDUCES)}")
    B, H, D = q.shape
    if kmin.dim() != 3 or kmin.shape != kmax.shape or kmin.shape[2] != D or H % kmin.shape[1]:
        raise ValueError(f"kmin/kmax must be [N_pages, H_kv, D] with H % H_kv == 0, got {tuple(kmin.shape)}")
    if page_table.dim() != 2 or page_table.shape[0] != B or tuple(n_pages.shape) != (B,):
        raise ValueError("page_table must be [B, n_max] and n_pages [B]")


def quest_page_scores(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    page_table: torch.Tensor,
    n_pages: torch.Tensor,
    group_reduce: str = "kv_head",
    config: dict | None = None,
) -> torch.Tensor:
    """Quest upper-bound scores of every logical page (Triton; CUDA or the interpreter).

    Parameters
    ----------
    q : ``[B, H, D]`` the current query of each sequence.
    kmin, kmax : ``[N_pages, H_kv, D]`` per physical page (one layer).
    page_table : ``[B, n_max]`` int32. n_pages : ``[B]`` int32 valid logical pages per sequence.
    group_reduce : ``kv_head`` (sum over the G query heads of a group, H_sel = H_kv), ``q_head``
        (H_sel = H) or ``layer`` (sum over all heads, H_sel = 1).
    config : launch settings for benchmarks (``bench kernels``): ``block_pages``, ``num_warps``,
        ``dot``; default :data:`BLOCK_PAGES`, :data:`SCORE_WARPS`, :data:`USE_DOT`.

    Returns
    -------
    ``[B, H_sel, n_max]`` fp32; pages ``>= n_pages[b]`` and empty pages (kmin = +inf) score -inf.
    """
    _check_scores(q, kmin, kmax, page_table, n_pages, group_reduce)
    require_triton(q, "quest_page_scores")
    B, H, D = q.shape
    H_kv = kmin.shape[1]
    n_max = page_table.shape[1]
    if q.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride(-1) != 1:
        raise ValueError("q, kmin and kmax must be contiguous in their last dimension")
    page_table, n_pages = page_table.contiguous(), n_pages.contiguous()
    sum_group = group_reduce != "q_head"
    scores = torch.empty(B, H_kv if sum_group else H, n_max, dtype=torch.float32, device=q.device)
    cfg = {"block_pages": BLOCK_PAGES, "num_warps": SCORE_WARPS, "dot": USE_DOT, **(config or {})}
    use_dot = cfg["dot"] and q.dtype == kmin.dtype == kmax.dtype  # the products must be exact in q's dtype
    G = H // H_kv
    grid = (B * H_kv, triton.cdiv(n_max, cfg["block_pages"]))
    _quest_page_scores_kernel[grid](
        q, kmin, kmax, page_table, n_pages, scores,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), kmax.stride(0), kmax.stride(1),
        page_table.stride(0), scores.stride(0), scores.stride(1),
        H_kv, D, n_max,
        G=G, SUM_GROUP=sum_group, USE_DOT=use_dot, BLOCK_P=cfg["block_pages"], BLOCK_G=max(16, next_pow2(G)),
        BLOCK_D=max(16, next_pow2(D)), DOT_PRECISION=dot_precision(kmin.dtype), num_warps=cfg["num_warps"],
    )  # fmt: skip
    if group_reduce == "layer":
        scores = scores.sum(dim=1, keepdim=True)
    return scores


def quest_page_scores_ref(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    page_table: torch.Tensor,
    n_pages: torch.Tensor,
    group_reduce: str = "kv_head",
) -> torch.Tensor:
    """Reference: the bound ``Σ_d max(q_d·kmax_d, q_d·kmin_d)`` per query head and page in fp32, -inf
    for empty pages (kmin = +inf) and pages ``>= n_pages[b]``, then the group reduction."""
    _check_scores(q, kmin, kmax, page_table, n_pages, group_reduce)
    B, H, _ = q.shape
    H_kv = kmin.shape[1]
    n_max = page_table.shape[1]
    phys = page_table.long()  # [B, n_max]
    lo = kmin[phys].float().repeat_interleave(H // H_kv, dim=2)  # [B, n_max, H, D]
    hi = kmax[phys].float().repeat_interleave(H // H_kv, dim=2)
    qf = q.float().unsqueeze(1)  # [B, 1, H, D]
    bound = torch.maximum(qf * hi, qf * lo).sum(dim=-1)  # [B, n_max, H]
    empty = (lo == float("inf")).any(dim=-1)
    exists = torch.arange(n_max, device=q.device).view(1, n_max, 1) < n_pages.long().view(B, 1, 1)
    scores = torch.where(empty | ~exists, float("-inf"), bound).transpose(1, 2)  # [B, H, n_max]
    if group_reduce == "q_head":
        return scores.contiguous()
    if group_reduce == "kv_head":
        return scores.view(B, H_kv, H // H_kv, n_max).sum(dim=2)
    return scores.sum(dim=1, keepdim=True)
