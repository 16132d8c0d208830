"""Top-k with an optional forced entry, at a static width, with a deterministic order.

Every selecting method ends in the same step: keep one forced entry (Quest's current page, the
oracle's current token) and the best ``k - 1`` others by score, or the best ``k`` when nothing is
forced (InfLLM's blocks). Entries scoring -inf (pages that do not exist or hold no key) are never
chosen. The result lists the forced entry first, then the others by descending score, equal scores
by ascending index, then -1 up to the static width ``k_max`` — the order of a stable descending
sort, so both implementations return identical lists, ties included.

Both fast versions order entries by (score descending, index ascending), with the score's fp32
bits made order-preserving as integers (-0.0 taken as +0.0), so equal scores are broken exactly as
the stable sort breaks them:

* ``topk_forced_select`` (Triton): one program per (sequence, selection head) holds the row in
  registers, finds the threshold score by bisection (of the ordered ints between the row's lowest
  and highest eligible score: at most 32 halvings, fewer when a threshold with exactly the wanted
  count turns up first; ties then taken by ascending index), compacts the chosen entries and
  gives each its slot by counting the chosen entries before it: one launch where the PyTorch
  version takes about twenty (key packing, forced scatter, ``torch.topk``'s gather and radix
  sort, masks, concatenation). Rows up to
  :data:`SELECT_MAX` entries (256K tokens at page 16). Measured dead ends (H200, 32K context):
  sorting each row in one program (``tl.sort``) took 30 us per call; ranking every entry by
  counting over the whole row (N² comparisons spread over the GPU) took 190 us per call at batch 8.
* ``topk_forced_packed`` (PyTorch): each score and its index packed into one int64 key (order bits
  high, the index's complement low), so one ``torch.topk`` over distinct keys gives the order; any
  row length.

``topk_forced`` (the op of ``engine.backend=triton``) takes the kernel where it can run and the row
fits, else the packed version; both are static-shape and sync-free (CUDA-graph capturable).
``topk_forced_ref`` is the definition: a stable sort.
"""

from __future__ import annotations

import torch

from retrobench.kernels._triton import HAS_TRITON, MAX, MIN, SUM, next_pow2, require_triton, tl, triton, triton_usable

LOW_MASK = 0xFFFFFFFF
SELECT_MAX = 16384  # longest row the selecting kernel holds in registers (N pages / tokens)

if HAS_TRITON:

    @triton.jit
    def _topk_forced_select_kernel(
        Scores, K, Forced, Out, Scratch,
        stride_sb, stride_sh, stride_ob, stride_oh,
        H_sel, N, k_max,
        HAS_FORCED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
        ROW_BOUNDS: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, selection head), the row in registers: the threshold score by bisection,
        the chosen entries compacted into scratch, then each one's slot by counting the chosen entries
        before it (``BLOCK_K``² comparisons, not N²)."""
        row = tl.program_id(0)
        b = row // H_sel
        h = row % H_sel
        out = Out + b * stride_ob + h * stride_oh
        f = -1
        lead = 0
        if HAS_FORCED:
            f = tl.load(Forced + b).to(tl.int32)
            lead = 1
            tl.store(out, f)
        n = tl.arange(0, BLOCK_N)
        # order-preserving int of each fp32 score (-0.0 as +0.0: equal floats get equal ints); an entry
        # may be chosen if it is inside the row, not the forced one, and above -inf (-2139095041 ordered)
        s = tl.load(Scores + b * stride_sb + h * stride_sh + n, mask=n < N, other=float("-inf")).to(tl.float32)
        bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
        o = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        ok = (n < N) & (n != f) & (o > -2139095041)
        n_ok = tl.reduce(ok.to(tl.int32), 0, SUM)
        want = tl.minimum(tl.minimum(tl.load(K + b).to(tl.int32), k_max) - lead, n_ok)
        # bisect for the largest t with at least `want` entries scoring >= t, keeping count = #(>= lo);
        # stop early once exactly `want` entries score >= lo (then no tie straddles the threshold).
        # t lies between the lowest and the highest eligible score (all n_ok >= want score >= the
        # lowest), so the halving starts there, not at the int32 range. lo, hi are int64 so hi - lo
        # cannot overflow; mid and lo always fit the ordered int32s.
        if ROW_BOUNDS:
            lo = tl.reduce(tl.where(ok, o, 2147483647), 0, MIN).to(tl.int64)
            hi = tl.reduce(tl.where(ok, o, -2147483648), 0, MAX).to(tl.int64)
        else:  # the whole int32 range (benchmarks: the earlier start)
            lo = tl.full([], -2147483648, tl.int64)
            hi = tl.full([], 2147483647, tl.int64)
        count = n_ok
        while (lo < hi) & (count > want):
            mid = lo + (hi - lo + 1) // 2
            at_least = tl.reduce((ok & (o >= mid.to(tl.int32))).to(tl.int32), 0, SUM)
            enough = at_least >= want
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
            count = tl.where(enough, at_least, count)
        t = lo.to(tl.int32)
        above = ok & (o > t)
        tie = (ok & (o == t)).to(tl.int32)
        tie_rank = tl.associative_scan(tie, 0, SUM) - tie  # equal scores: lower index first
        chosen = above | ((tie > 0) & (tie_rank < want - tl.reduce(above.to(tl.int32), 0, SUM)))
        chosen = chosen & (tl.zeros([BLOCK_N], tl.int32) < want)  # want = 0: the bisection ran on nothing
        c = tl.associative_scan(chosen.to(tl.int32), 0, SUM) - chosen.to(tl.int32)
        scratch = Scratch + row * 2 * BLOCK_K
        tl.store(scratch + c, o, mask=chosen)
        tl.store(scratch + BLOCK_K + c, n, mask=chosen)
        tl.debug_barrier()
        i = tl.arange(0, BLOCK_K)
        o_i = tl.load(scratch + i, mask=i < want, other=0)
        n_i = tl.load(scratch + BLOCK_K + i, mask=i < want, other=0)
        rank = tl.zeros([BLOCK_K], tl.int32)
        for j0 in range(0, want, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            o_j = tl.load(scratch + j, mask=j < want, other=0)
            n_j = tl.load(scratch + BLOCK_K + j, mask=j < want, other=0)
            before = (o_j[None, :] > o_i[:, None]) | ((o_j[None, :] == o_i[:, None]) & (n_j[None, :] < n_i[:, None]))
            rank += tl.reduce((before & (j < want)[None, :]).to(tl.int32), 1, SUM)
        tl.store(out + lead + rank, n_i, mask=i < want)
        for p0 in range(0, k_max - lead, BLOCK_K):  # -1 after the chosen entries
            p = p0 + tl.arange(0, BLOCK_K)
            tl.store(out + lead + p, tl.full([BLOCK_K], -1, tl.int32), mask=(p >= want) & (p < k_max - lead))


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
    :func:`topk_forced_select` where Triton can run and the row fits (``N <= SELECT_MAX``), else
    :func:`topk_forced_packed`. Parameters and result as :func:`topk_forced_packed`."""
    if triton_usable(scores) and scores.shape[-1] <= SELECT_MAX:
        return topk_forced_select(scores, k, k_max, forced)
    return topk_forced_packed(scores, k, k_max, forced)


def _select_warps(block_n: int) -> int:
    """Warps per row: 8 from 2048 entries up (H200: 8 took 23.5 us at 8192 entries where 16 took 25.5, 4 took 26.2)."""
    return min(8, max(4, block_n // 256))


def topk_forced_select(
    scores: torch.Tensor, k: torch.Tensor, k_max: int, forced: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """:func:`topk_forced_packed` as one Triton kernel (rows of at most :data:`SELECT_MAX` entries);
    ``config`` (benchmarks: ``bench kernels``) may set ``num_warps`` (default :func:`_select_warps`) and
    ``row_bounds`` (default True: the bisection starts between the row's lowest and highest eligible
    score; False: over the whole int32 range, as before)."""
    _check(scores, k, k_max, forced)
    B, H_sel, N = scores.shape
    if N > SELECT_MAX:
        raise ValueError(f"topk_forced_select holds rows of at most {SELECT_MAX} entries, got {N}")
    require_triton(scores, "topk_forced_select")
    scores = scores.contiguous()
    k = k.to(device=scores.device).contiguous()
    out = torch.empty(B, H_sel, k_max, dtype=torch.int32, device=scores.device)
    block_k = max(16, next_pow2(min(k_max, N)))
    scratch = torch.empty(B * H_sel, 2, block_k, dtype=torch.int32, device=scores.device)
    forced_t = k if forced is None else forced.to(device=scores.device).contiguous()  # unread without forced
    block_n = max(16, next_pow2(N))
    cfg = config or {}
    _topk_forced_select_kernel[(B * H_sel,)](
        scores, k, forced_t, out, scratch, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        H_sel, N, k_max, HAS_FORCED=forced is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_J=min(block_k, max(16, 8192 // block_k)), ROW_BOUNDS=cfg.get("row_bounds", True),
        num_warps=cfg.get("num_warps", _select_warps(block_n)),
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
