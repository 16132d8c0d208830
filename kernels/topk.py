"""Top-k with an optional forced entry, at a static width, with a deterministic order.

Every selecting method ends in the same step: keep one forced entry (Quest's current page, the
oracle's current token) and the best ``k - 1`` others by score, or the best ``k`` when nothing is
forced (InfLLM's blocks). Entries scoring -inf (pages that do not exist or hold no key) are never
chosen. The result lists the forced entry first, then the others by descending score, equal scores
by ascending index, then -1 up to the static width ``k_max`` — the order of a stable descending
sort, so both implementations return identical lists, ties included.

Both fast versions pack each fp32 score and its index into one int64 key (the score's bits made
order-preserving in the high word, the complement of the index in the low word), so the keys are
distinct and their descending order is the stable order exactly:

* ``topk_forced_rank`` (Triton): an entry's slot in the list is its rank, the number of entries whose
  key is larger, so programs over (row, block of entries) count, tile by tile, and write each
  chosen entry straight to its slot: one launch where the PyTorch version takes about twenty (key
  packing, forced scatter, ``torch.topk``'s gather and radix sort, masks, concatenation), and the
  work spreads over the whole GPU even at batch 1 (a row per program, sorting in registers, took
  30 us per call at 2048 entries on an H200). The counting grows as N²: rows up to
  :data:`RANK_MAX` entries (256K tokens at page 16).
* ``topk_forced_packed`` (PyTorch): the same keys through one ``torch.topk``, for any row length.

``topk_forced`` (the op of ``engine.backend=triton``) takes the kernel where it can run and the row
fits, else the packed version; both are static-shape and sync-free (CUDA-graph capturable).
``topk_forced_ref`` is the definition: a stable sort.
"""

from __future__ import annotations

import torch

from retrobench.kernels._triton import HAS_TRITON, require_triton, tl, triton, triton_usable

LOW_MASK = 0xFFFFFFFF
RANK_MAX = 16384  # longest row the rank kernel takes (N pages / tokens): its work grows as N^2
BLOCK_I, BLOCK_J = 64, 128

if HAS_TRITON:

    @triton.jit
    def _ordered(Row, n, N, f):
        """Order-preserving int32 of each fp32 score (-0.0 as +0.0) and whether it may be chosen
        (inside the row, not the forced entry ``f``, above -inf)."""
        s = tl.load(Row + n, mask=n < N, other=float("-inf")).to(tl.float32)
        s = tl.where(s == 0.0, 0.0, s)  # equal floats get equal keys
        bits = s.to(tl.int32, bitcast=True)
        o = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return o, (n < N) & (n != f) & (o > -2139095041)  # -2139095041: -inf ordered

    @triton.jit
    def _topk_forced_rank_kernel(
        Scores, K, Forced, Out,
        stride_sb, stride_sh, stride_ob, stride_oh,
        H_sel, N, k_max,
        HAS_FORCED: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    ):  # fmt: skip
        """Program (row, block of entries): each entry's rank among the row's choosable entries (score
        descending, index ascending) by counting the entries before it, tile by tile; an entry of rank
        r < k - lead goes to slot lead + r. The block's slots past the chosen ones get -1."""
        row = tl.program_id(0)
        b = row // H_sel
        h = row % H_sel
        Row = Scores + b * stride_sb + h * stride_sh
        out = Out + b * stride_ob + h * stride_oh
        f = -1
        lead = 0
        if HAS_FORCED:
            f = tl.load(Forced + b).to(tl.int32)
            lead = 1
        k = tl.minimum(tl.load(K + b).to(tl.int32), k_max) - lead
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        o_i, ok_i = _ordered(Row, i, N, f)
        rank = tl.zeros([BLOCK_I], tl.int32)
        n_ok = 0
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            o_j, ok_j = _ordered(Row, j, N, f)
            before = (o_j[None, :] > o_i[:, None]) | ((o_j[None, :] == o_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((before & ok_j[None, :]).to(tl.int32), 1)
            n_ok += tl.sum(ok_j.to(tl.int32), 0)
        chosen = ok_i & (rank < k)
        tl.store(out + lead + rank, i, mask=chosen)
        filled = tl.minimum(k, n_ok)  # slots [lead, lead + filled) hold the chosen entries
        tl.store(out + lead + i, tl.full([BLOCK_I], -1, tl.int32), mask=(i >= filled) & (i < k_max - lead))
        if HAS_FORCED:
            if tl.program_id(1) == 0:
                tl.store(out, f)


def _check(scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None) -> None:
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H_sel, N], got {tuple(scores.shape)}")
    B = scores.shape[0]
    if tuple(k.shape) != (B,) or (forced is not None and tuple(forced.shape) != (B,)):
        raise ValueError("k and forced must be [B]")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (score descending, index ascending); scores fp32."""
    s = scores.float() + 0.0  # -0.0 -> +0.0: equal floats must get equal high words
    bits = s.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE bits -> two's-complement order
    index = torch.arange(s.shape[-1], device=s.device, dtype=torch.int64)
    return (ordered.to(torch.int64) << 32) | (LOW_MASK - index)


def topk_forced(
    scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """The forced entry plus the top ``k[b] - 1`` others (or the top ``k[b]``), static width ``k_max``:
    :func:`topk_forced_rank` where Triton can run and the row fits (``N <= RANK_MAX``), else
    :func:`topk_forced_packed`. Parameters and result as :func:`topk_forced_packed`."""
    if triton_usable(scores) and scores.shape[-1] <= RANK_MAX:
        return topk_forced_rank(scores, k, k_max, forced)
    return topk_forced_packed(scores, k, k_max, forced)


def topk_forced_rank(
    scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`topk_forced_packed` as one Triton kernel (rows of at most :data:`RANK_MAX` entries)."""
    _check(scores, k, k_max, forced)
    B, H_sel, N = scores.shape
    if N > RANK_MAX:
        raise ValueError(f"topk_forced_rank takes rows of at most {RANK_MAX} entries, got {N}")
    require_triton(scores, "topk_forced_rank")
    scores = scores.contiguous()
    k = k.to(device=scores.device).contiguous()
    out = torch.empty(B, H_sel, k_max, dtype=torch.int32, device=scores.device)
    forced_t = k if forced is None else forced.to(device=scores.device).contiguous()  # unread without forced
    grid = (B * H_sel, triton.cdiv(max(N, k_max), BLOCK_I))
    _topk_forced_rank_kernel[grid](
        scores, k, forced_t, out, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        H_sel, N, k_max, HAS_FORCED=forced is not None, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, num_warps=4,
    )  # fmt: skip
    return out


def topk_forced_packed(
    scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """The forced entry plus the top ``k[b] - 1`` others (or the top ``k[b]``), static width ``k_max``,
    through one ``torch.topk`` over the packed keys (any row length, any device).

    Parameters
    ----------
    scores : ``[B, H_sel, N]`` float scores; -inf = never chosen (except as the forced entry).
    k : ``[B]`` int entries to keep per sequence and selection head, the forced one included;
        clamped to ``k_max``.
    k_max : static output width (>= 1).
    forced : ``[B]`` int entry always kept (slot 0), or None.

    Returns
    -------
    ``[B, H_sel, k_max]`` int32: the kept entries in stable descending order (forced first), then -1.
    """
    _check(scores, k, k_max, forced)
    B, H_sel, N = scores.shape
    keys = _order_keys(scores)
    lead = 0 if forced is None else 1
    if forced is not None:
        f = forced.to(device=scores.device, dtype=torch.int64).view(B, 1, 1).expand(B, H_sel, 1)
        keys = keys.scatter(2, f, torch.iinfo(torch.int64).min)
    width = max(0, min(k_max - lead, N))
    parts = []
    if forced is not None:
        parts.append(f)
    if width:
        _, idx = torch.topk(keys, width, dim=-1)  # distinct keys: a total order, no ties
        chosen = torch.gather(scores.float(), 2, idx)
        rank = torch.arange(width, device=scores.device).view(1, 1, width)
        keep = (rank < (k.to(scores.device).view(B, 1, 1).long() - lead)) & (chosen > float("-inf"))
        if forced is not None:
            keep &= idx != f
        parts.append(torch.where(keep, idx, torch.full_like(idx, -1)))
    if lead + width < k_max:
        parts.append(torch.full((B, H_sel, k_max - lead - width), -1, dtype=torch.int64, device=scores.device))
    return torch.cat(parts, dim=-1).to(torch.int32)


def topk_forced_ref(
    scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: a stable descending sort of the scores with the forced entry set aside, the first
    ``k[b] - 1`` (or ``k[b]``) entries above -inf, the forced entry in front, -1 after."""
    _check(scores, k, k_max, forced)
    B, H_sel, N = scores.shape
    others = scores.float().clone()
    if forced is not None:
        f = forced.to(device=scores.device, dtype=torch.int64).view(B, 1, 1).expand(B, H_sel, 1)
        others.scatter_(2, f, float("-inf"))
    values, order = torch.sort(others, dim=-1, descending=True, stable=True)
    lead = 0 if forced is None else 1
    rank = torch.arange(N, device=scores.device).view(1, 1, N)
    kept = (rank < torch.clamp(k.to(scores.device).view(B, 1, 1).long(), max=k_max) - lead) & (values > float("-inf"))
    listed = torch.where(kept, order, torch.full_like(order, -1))  # a prefix: values are sorted
    parts = ([f] if forced is not None else []) + [listed[..., : k_max - lead]]
    out = torch.cat(parts, dim=-1)
    if out.shape[-1] < k_max:
        out = torch.cat([out, out.new_full((B, H_sel, k_max - out.shape[-1]), -1)], dim=-1)
    return out.to(torch.int32)
