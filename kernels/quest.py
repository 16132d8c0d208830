"""Quest page selection on device: page upper-bound scores (Triton) and top-k with a forced page (torch).

Quest (Tang et al., ICML 2024) scores page p for query head h by
``Σ_i max(q_i·kmax_i, q_i·kmin_i)``, an upper bound of ``q·k`` over the page's keys, from the
per-page, per-KV-head channel min/max the cache keeps exact. ``quest_page_scores`` computes it for
every page of every sequence in one launch, reading each page's min/max once per KV head for the
G query heads of the group, and reduces over heads on the fly (``group_reduce``, the GQA policy of
``methods/common.py::reduce_head_scores``). ``quest_select`` then keeps the forced page (the one
holding the current token) plus the top ``k[b] - 1`` others with ``torch.topk`` at a static width
``k_max``, without any host synchronisation, so the decode step can be captured in a CUDA graph.

The references delegate to the method code (``methods/quest.py``, ``methods/common.py``): the
kernel is tested against the definition the torch backend runs.
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, next_pow2, tl, triton, triton_usable

GROUP_REDUCES = ("kv_head", "q_head", "layer")
BLOCK_PAGES = 64

if HAS_TRITON:

    @triton.jit
    def _quest_page_scores_kernel(
        Q, Kmin, Kmax, PageTable, NPages, Scores,
        stride_qb, stride_qh,
        stride_mn, stride_mh, stride_xn, stride_xh,
        stride_ptb, stride_sb, stride_sh,
        H_KV, D, n_max,
        G: tl.constexpr, SUM_GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, KV head, block of pages): scores ``[G, BLOCK_P]`` or their group sum."""
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
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
        empty = tl.max(tl.where(lo == float("inf"), 1, 0), 1) > 0  # an empty page holds kmin = +inf
        live = p_ok & (~empty)
        total = tl.zeros([BLOCK_P], tl.float32)
        for gi in tl.static_range(G):
            qg = tl.load(Q + b * stride_qb + (kv * G + gi) * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
            score = tl.sum(tl.maximum(qg[None, :] * hi, qg[None, :] * lo), 1)
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
) -> torch.Tensor:
    """Quest upper-bound scores of every logical page (Triton; reference otherwise).

    Parameters
    ----------
    q : ``[B, H, D]`` the current query of each sequence.
    kmin, kmax : ``[N_pages, H_kv, D]`` per physical page (one layer).
    page_table : ``[B, n_max]`` int32. n_pages : ``[B]`` int32 valid logical pages per sequence.
    group_reduce : ``kv_head`` (sum over the G query heads of a group, H_sel = H_kv), ``q_head``
        (H_sel = H) or ``layer`` (sum over all heads, H_sel = 1).

    Returns
    -------
    ``[B, H_sel, n_max]`` fp32; pages ``>= n_pages[b]`` and empty pages (kmin = +inf) score -inf.
    """
    _check_scores(q, kmin, kmax, page_table, n_pages, group_reduce)
    if not triton_usable(q):
        return quest_page_scores_ref(q, kmin, kmax, page_table, n_pages, group_reduce)
    B, H, D = q.shape
    H_kv = kmin.shape[1]
    n_max = page_table.shape[1]
    if q.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride(-1) != 1:
        raise ValueError("q, kmin and kmax must be contiguous in their last dimension")
    page_table, n_pages = page_table.contiguous(), n_pages.contiguous()
    sum_group = group_reduce != "q_head"
    scores = torch.empty(B, H_kv if sum_group else H, n_max, dtype=torch.float32, device=q.device)
    grid = (B * H_kv, triton.cdiv(n_max, BLOCK_PAGES))
    _quest_page_scores_kernel[grid](
        q, kmin, kmax, page_table, n_pages, scores,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), kmax.stride(0), kmax.stride(1),
        page_table.stride(0), scores.stride(0), scores.stride(1),
        H_kv, D, n_max,
        G=H // H_kv, SUM_GROUP=sum_group, BLOCK_P=BLOCK_PAGES, BLOCK_D=next_pow2(D), num_warps=4,
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
    """Reference: ``methods/quest.py::quest_page_scores`` then ``methods/common.py::reduce_head_scores``
    per sequence, padded with -inf past ``n_pages[b]``; empty pages (kmin = +inf) score -inf
    in both.
    """
    from retrobench.methods.common import reduce_head_scores  # lazy: kernels import no method code at import
    from retrobench.methods.quest import quest_page_scores as method_scores

    _check_scores(q, kmin, kmax, page_table, n_pages, group_reduce)
    B, H, _ = q.shape
    H_kv = kmin.shape[1]
    n_max = page_table.shape[1]
    h_sel = {"kv_head": H_kv, "q_head": H, "layer": 1}[group_reduce]
    out = torch.full((B, h_sel, n_max), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(n_pages[b])
        phys = page_table[b, :n].long()
        lo, hi = kmin[phys], kmax[phys]
        scores = method_scores(q[b], lo, hi)  # [H, n]; empty pages already -inf
        out[b, :, :n] = reduce_head_scores(scores, group_reduce, H_kv)
    return out


def quest_select(scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor) -> torch.Tensor:
    """The forced page plus the top ``k[b] - 1`` other pages, at a static width ``k_max``.

    Parameters
    ----------
    scores : ``[B, H_sel, n_max]`` page scores; -inf marks a page that does not exist (or is empty).
    k : ``[B]`` int pages to select per sequence (the forced page included); clamped to ``k_max``.
    k_max : static number of output slots (>= 1).
    forced : ``[B]`` int the page holding the current token; always selected (slot 0).

    Returns
    -------
    ``[B, H_sel, k_max]`` int32 logical pages: the forced page, then the others by descending
    score; slots past ``k[b]`` or past the pages with a score above -inf are -1. Pure torch with
    static shapes and no host synchronisation (CUDA-graph capturable). Equal scores may resolve
    differently from the reference's stable sort (``torch.topk`` does not promise an order among
    ties), so only tie-free scores give identical page sets.
    """
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    B, H_sel, n_max = scores.shape
    forced = forced.to(device=scores.device, dtype=torch.long)
    others = scores.float().scatter(2, forced.view(B, 1, 1).expand(B, H_sel, 1), float("-inf"))
    width = min(k_max - 1, n_max)
    values, idx = torch.topk(others, width, dim=-1)  # [B, H_sel, width]
    rank = torch.arange(1, width + 1, device=scores.device)
    keep = (rank.view(1, 1, width) < k.to(scores.device).view(B, 1, 1)) & (values > float("-inf"))
    idx = torch.where(keep, idx, torch.full_like(idx, -1))
    parts = [forced.view(B, 1, 1).expand(B, H_sel, 1), idx]
    if width < k_max - 1:
        parts.append(torch.full((B, H_sel, k_max - 1 - width), -1, dtype=torch.long, device=scores.device))
    return torch.cat(parts, dim=-1).to(torch.int32)


def quest_select_ref(scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor) -> torch.Tensor:
    """Reference: ``methods/common.py::topk_with_forced`` per sequence over its pages with a score
    above -inf (the tail of -inf columns is padding), selected pages listed ascending, then -1."""
    from retrobench.methods.common import topk_with_forced  # lazy: kernels import no method code at import

    B, H_sel, _ = scores.shape
    out = torch.full((B, H_sel, k_max), -1, dtype=torch.int32, device=scores.device)
    for b in range(B):
        valid = (scores[b] > float("-inf")).any(dim=0)
        n = int(valid.nonzero().max()) + 1 if bool(valid.any()) else 0
        f = int(forced[b])
        n = max(n, f + 1)
        mask = topk_with_forced(scores[b, :, :n].float(), min(int(k[b]), k_max), f)
        mask &= scores[b, :, :n] > float("-inf")  # pages that do not exist are never attended ...
        mask[:, f] = True  # ... except the forced one
        for h in range(H_sel):
            ids = mask[h].nonzero().flatten()
            out[b, h, : ids.numel()] = ids.to(torch.int32)
    return out
