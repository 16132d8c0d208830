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

* ``topk_forced_sort`` (Triton): one program per (sequence, selection head) loads the row, builds the
  keys, sorts them in registers (``tl.sort``, bitonic) and writes the list: one launch where the
  PyTorch version takes about twenty (key packing, forced scatter, ``torch.topk``'s gather and radix
  sort, masks, concatenation). Rows up to :data:`SORT_MAX` entries (256K tokens at page 16).
* ``topk_forced_packed`` (PyTorch): the same keys through one ``torch.topk``, for any row length.

``topk_forced`` (the op of ``engine.backend=triton``) takes the kernel where it can run and the row
fits, else the packed version; both are static-shape and sync-free (CUDA-graph capturable).
``topk_forced_ref`` is the definition: a stable sort.
"""

from __future__ import annotations

import torch

from retrobench.kernels._triton import HAS_TRITON, next_pow2, require_triton, tl, triton, triton_usable

LOW_MASK = 0xFFFFFFFF
SORT_MAX = 16384  # longest row the sorting kernel holds in registers (N pages / tokens)
NEG_INF_ORDERED = -2139095041  # the order-preserving int32 of -inf's bits (0xFF800000 ^ 0x7FFFFFFF)

if HAS_TRITON:

    @triton.jit
    def _topk_forced_sort_kernel(
        Scores, K, Forced, Out,
        stride_sb, stride_sh, stride_ob, stride_oh,
        H_sel, N, k_max,
        HAS_FORCED: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, selection head): keys of the row, a descending sort, the list."""
        pid = tl.program_id(0)
        b = pid // H_sel
        h = pid % H_sel
        n = tl.arange(0, BLOCK_N)
        s = tl.load(Scores + b * stride_sb + h * stride_sh + n, mask=n < N, other=float("-inf")).to(tl.float32)
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal floats get equal keys
        bits = s.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (ordered.to(tl.int64) << 32) | (4294967295 - n.to(tl.int64))
        lowest = -9223372036854775807 - 1
        keys = tl.where(n < N, keys, lowest)
        k = tl.minimum(tl.load(K + b).to(tl.int32), k_max)
        lead = 0
        out = Out + b * stride_ob + h * stride_oh
        if HAS_FORCED:
            f = tl.load(Forced + b).to(tl.int32)
            keys = tl.where(n == f, lowest, keys)  # set aside: listed first, never again
            lead = 1
            tl.store(out, f)
        keys = tl.sort(keys, 0, descending=True)
        high = (keys >> 32).to(tl.int32)
        index = (4294967295 - (keys & 4294967295)).to(tl.int32)
        keep = (n < k - lead) & (high > -2139095041)  # within k, score above -inf
        tl.store(out + lead + n, tl.where(keep, index, -1), mask=n < k_max - lead)
        for start in range(lead + BLOCK_N, k_max, BLOCK_N):  # a list wider than the row: -1 past it
            tl.store(out + start + n, tl.full([BLOCK_N], -1, tl.int32), mask=start + n < k_max)


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
    :func:`topk_forced_sort` where Triton can run and the row fits (``N <= SORT_MAX``), else
    :func:`topk_forced_packed`. Parameters and result as :func:`topk_forced_packed`."""
    if triton_usable(scores) and scores.shape[-1] <= SORT_MAX:
        return topk_forced_sort(scores, k, k_max, forced)
    return topk_forced_packed(scores, k, k_max, forced)


def topk_forced_sort(
    scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`topk_forced_packed` as one Triton kernel (rows of at most :data:`SORT_MAX` entries)."""
    _check(scores, k, k_max, forced)
    B, H_sel, N = scores.shape
    if N > SORT_MAX:
        raise ValueError(f"topk_forced_sort holds rows of at most {SORT_MAX} entries, got {N}")
    require_triton(scores, "topk_forced_sort")
    scores = scores.contiguous()
    k = k.to(device=scores.device).contiguous()
    out = torch.empty(B, H_sel, k_max, dtype=torch.int32, device=scores.device)
    block = max(16, next_pow2(N))
    forced_t = k if forced is None else forced.to(device=scores.device).contiguous()  # unread without forced
    _topk_forced_sort_kernel[(B * H_sel,)](
        scores, k, forced_t, out, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        H_sel, N, k_max, HAS_FORCED=forced is not None, BLOCK_N=block, num_warps=min(16, max(4, block // 256)),
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
