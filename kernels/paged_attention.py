"""Sparse paged attention: split-K flash-decoding over a per-selection-head unit list, GQA-packed.

One call attends the S queries of each sequence (the current token and, for RetroAttention, the
past tokens of its window; or a whole prefill chunk) to the units each selection head chose,
straight from the paged cache. A *unit* is a page of P keys; passing the cache as pages of one
token (``k_cache.view(-1, 1, H_kv, D)`` with a per-token table) makes it a token list, which is
how token-level selections (the oracle's top-k tokens, InfLLM's windows) run on the same kernel.

Kernel design (anchors-methods.md §4.1-4.4; SGLang/LightLLM two-stage decode, vLLM unified
attention's GQA packing, Flash-Decoding):

* one program per (sequence b, selection head, split, row block). A selection head covers
  ``G_sel = H / H_sel`` query heads of one KV head (``H_sel = H_kv``: a page set per KV head, the
  G query heads of its group packed; ``H_sel = H``: one set per query head). Its rows are those
  query heads times the S queries (row r = g*S + s), so every selected unit's K/V is loaded ONCE
  for all of them: RetroAttention's past-token queries read no extra KV;
* the first ``num_units[b]`` entries of the list (all K when not given) are split evenly between
  ``num_splits`` programs (split-K, sized per sequence inside the kernel); each walks its share in
  tiles of BLOCK_N tokens, gathers K/V through ``page_table`` and keeps an online softmax in
  base 2 (logits pre-scaled by ``scaling * log2(e)``) with fp32 accumulators;
* visibility per (query, key): the entry is not padding (-1), causal (``t <= q_pos``), optional
  ``key_mask`` (eviction), optional RetroAttention step mask (``page_step[unit] < q_step``);
* each split writes a normalised partial output and its natural-log LSE (``m + log2(l)`` times
  ln 2; the base-2 pitfall of §4.3), and ``_reduce_splits_kernel`` merges the splits (§4.4); with
  one split the first kernel writes the final output directly.

A query that sees no key gets out = 0 and lse = -inf (the merge identity), as in
``attention_ref``. Shapes: glossary in methods/base.py; the reference is
:func:`sparse_paged_attention_ref` (a gather and a masked softmax, fp32).
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import (
    HAS_TRITON,
    INTERPRET,
    LOG2E,
    MAX,
    SUM,
    dot_precision,
    next_pow2,
    require_triton,
    target_programs,
    tl,
    triton,
)
from retrobench.kernels.attention_ref import attention_ref

BLOCK_N = 32 if INTERPRET else 64  # keys per tile (power of two >= 16: tl.dot's minimum)
MAX_BLOCK_M = 64  # packed query rows (G_sel*S) per program; more rows take more row blocks
MIN_TOKENS_PER_SPLIT = 128  # a split smaller than this costs more in its reduce than it saves
MAX_SPLITS = 64

if HAS_TRITON:

    @triton.jit
    def _sparse_paged_attention_kernel(
        Q, Kc, Vc, PageTable, Pages, NumUnits, QPos, KeyMask, PageStep, QStep, Out, Lse,
        sm_scale_log2,
        stride_qb, stride_qh, stride_qs,
        stride_kn, stride_kp, stride_kh,
        stride_vn, stride_vp, stride_vh,
        stride_ptb, stride_pgb, stride_pgh, stride_qpb,
        stride_kmb, stride_kmh, stride_psb, stride_psh, stride_qsb,
        stride_ob, stride_oh, stride_os, stride_osp,
        stride_lb, stride_lh, stride_ls, stride_lsp,
        H_SEL, S, D, K_UNITS, NUM_SPLITS,
        G: tl.constexpr, G_SEL: tl.constexpr, P: tl.constexpr, ALIGN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_NUM_UNITS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_PAGE_STEP: tl.constexpr,
        IN_ORDER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_bs = tl.program_id(0)
        split = tl.program_id(1)
        pid_m = tl.program_id(2)
        b = pid_bs // H_SEL
        sel = pid_bs % H_SEL
        kv = (sel * G_SEL) // G

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows r = g*S + s
        row_ok = rows < G_SEL * S
        g = rows // S
        s = rows % S
        h = sel * G_SEL + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D

        q = tl.load(
            Q + b * stride_qb + h[:, None] * stride_qh + s[:, None] * stride_qs + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(Kc.dtype.element_ty)  # fmt: skip
        q_pos = tl.load(QPos + b * stride_qpb + s, mask=row_ok, other=-1)
        if HAS_PAGE_STEP:
            q_step = tl.load(QStep + b * stride_qsb + s, mask=row_ok, other=0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        n_units = K_UNITS
        if HAS_NUM_UNITS:
            n_units = tl.minimum(tl.load(NumUnits + b).to(tl.int32), K_UNITS)
        num_tokens = n_units * P
        per_split = (num_tokens + NUM_SPLITS - 1) // NUM_SPLITS
        per_split = ((per_split + ALIGN - 1) // ALIGN) * ALIGN  # splits start on page (or tile) boundaries
        start = split * per_split
        end = tl.minimum(start + per_split, num_tokens)
        if IN_ORDER:  # entry n is position n: nothing past the block's last query is visible (causal prefill)
            end = tl.minimum(end, (tl.reduce(q_pos, 0, MAX) + 1).to(tl.int32))
        units_row = Pages + b * stride_pgb + sel * stride_pgh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)  # token index within the selection: entry n // P, slot n % P
            slot = n % P
            lp = tl.load(units_row + n // P, mask=n < end, other=-1)  # logical unit, -1 = padding
            col_ok = lp >= 0
            phys = tl.load(PageTable + b * stride_ptb + lp, mask=col_ok, other=0).to(tl.int64)
            t = lp * P + slot  # key position
            if HAS_KEY_MASK:
                km = tl.load(KeyMask + b * stride_kmb + kv * stride_kmh + t, mask=col_ok, other=0)
                col_ok = col_ok & (km != 0)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(Kc + phys[:, None] * stride_kn + slot[:, None] * stride_kp + kv * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
            vis = col_ok[None, :] & (t[None, :] <= q_pos[:, None])
            if HAS_PAGE_STEP:
                ps = tl.load(PageStep + b * stride_psb + sel * stride_psh + lp, mask=col_ok, other=0)
                vis = vis & (ps[None, :] < q_step[:, None])
            qk = tl.where(vis, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, MAX))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
            p = tl.exp2(qk - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.reduce(p, 1, SUM)
            v = tl.load(Vc + phys[:, None] * stride_vn + slot[:, None] * stride_vp + kv * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(
            Out + b * stride_ob + h[:, None] * stride_oh + s[:, None] * stride_os + split * stride_osp + d[None, :],
            out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
        )  # fmt: skip
        tl.store(Lse + b * stride_lb + h * stride_lh + s * stride_ls + split * stride_lsp, lse, mask=row_ok)

    @triton.jit
    def _reduce_splits_kernel(
        PartOut, PartLse, Out, Lse, ROWS, NUM_SPLITS, D, H, S, stride_ob, stride_oh, stride_os,
        BLOCK_R: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Merge the per-split (out, lse) of BLOCK_R query rows (b, h, s): parts are contiguous
        ``[B·H·S, NUM_SPLITS, D]``, the LSE ``[B·H·S]``, the output in its own strides."""
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = row < ROWS
        b = row // (H * S)
        h = (row // S) % H
        s = row % S
        sp = tl.arange(0, BLOCK_SPLITS)
        d = tl.arange(0, BLOCK_D)
        sp_ok = row_ok[:, None] & (sp[None, :] < NUM_SPLITS)
        lse = tl.load(PartLse + row[:, None] * NUM_SPLITS + sp[None, :], mask=sp_ok, other=float("-inf"))
        m = tl.reduce(lse, 1, MAX)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m_ref[:, None]))  # [BLOCK_R, BLOCK_SPLITS]
        part = (row[:, None, None] * NUM_SPLITS + sp[None, :, None]) * D + d[None, None, :]
        o = tl.load(PartOut + part, mask=sp_ok[:, :, None] & (d[None, None, :] < D), other=0.0)
        total = tl.reduce(w, 1, SUM)
        denom = tl.where(total > 0, total, 1.0)
        out = tl.reduce(w[:, :, None] * o, 1, SUM) / denom[:, None]  # [BLOCK_R, BLOCK_D]
        dst = Out + b[:, None] * stride_ob + h[:, None] * stride_oh + s[:, None] * stride_os + d[None, :]
        tl.store(dst, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))
        tl.store(Lse + row, tl.where(total > 0, m_ref + tl.log(denom), float("-inf")), mask=row_ok)


def _check(q, k_cache, v_cache, page_table, pages, q_pos, key_mask, page_step, q_step, num_units) -> None:
    B, H, S, D = q.shape
    _, P, H_kv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if H % H_kv:
        raise ValueError(f"H={H} is not a multiple of H_kv={H_kv}")
    if P & (P - 1):
        raise ValueError(f"page size {P} is not a power of two")
    if pages.dim() != 3 or pages.shape[0] != B or pages.shape[1] % H_kv or H % pages.shape[1]:
        raise ValueError(
            f"pages must be [B, H_sel, K] with H_sel a multiple of H_kv={H_kv} dividing H={H}, got {tuple(pages.shape)}"
        )
    if page_table.dim() != 2 or page_table.shape[0] != B or tuple(q_pos.shape) != (B, S):
        raise ValueError("page_table must be [B, n_max] and q_pos [B, S]")
    T_max = page_table.shape[1] * P
    if key_mask is not None and tuple(key_mask.shape) != (B, H_kv, T_max):
        raise ValueError(f"key_mask must be [B, H_kv, n_max*P] = [{B}, {H_kv}, {T_max}], got {tuple(key_mask.shape)}")
    if (page_step is None) != (q_step is None):
        raise ValueError("page_step and q_step come together")
    if page_step is not None and (
        page_step.dim() != 3 or tuple(page_step.shape[:2]) != tuple(pages.shape[:2])
        or page_step.shape[2] < page_table.shape[1] or tuple(q_step.shape) != (B, S)
    ):  # fmt: skip
        raise ValueError("page_step must be [B, H_sel, >= n_max] and q_step [B, S]")
    if num_units is not None and tuple(num_units.shape) != (B,):
        raise ValueError(f"num_units must be [B], got {tuple(num_units.shape)}")


#: Launch settings of the kernel (``config`` overrides any of them, for ``bench kernels``).
DEFAULT_LAUNCH = {"max_block_m": MAX_BLOCK_M, "block_n": BLOCK_N, "num_warps": 4, "num_stages": 2}
#: Settings taken over :data:`DEFAULT_LAUNCH` with 17-32 rows a program (RetroAttention at w = 5..8
#: packs 4 heads x w queries) and splits of 4 default tiles or more (:func:`launch_settings`):
#: ``bench kernels`` measured them faster at 32 rows, H200, batch 8, 2,048 keys, 45 us against 62
#: (results/bench/kernels.md); batch 1's splits of 128 keys are fastest with the default. More rows
#: (prefill chunks through this kernel) keep the default: not measured there.
MANY_ROWS_LONG_SPLITS = {"block_n": 32, "num_warps": 4, "num_stages": 3}


def launch_settings(rows: int, split_tokens: int, config: dict | None = None) -> dict:
    """Launch settings for ``rows`` packed query rows a program (G_sel * S) and splits of
    ``split_tokens`` keys: :data:`DEFAULT_LAUNCH`, with :data:`MANY_ROWS_LONG_SPLITS` over it when
    ``16 < rows <= 32`` and ``split_tokens >= 4 * BLOCK_N``; ``config`` overrides any key."""
    cfg = dict(DEFAULT_LAUNCH)
    if 16 < rows <= 32 and split_tokens >= 4 * DEFAULT_LAUNCH["block_n"]:
        cfg.update(MANY_ROWS_LONG_SPLITS)
    return {**cfg, **(config or {})}


#: Most split partials a reduce program holds (rows x splits x D, fp32: 64 registers a thread at 4 warps).
REDUCE_TILE = 8192


def reduce_rows(rows: int, splits: int, d: int, programs: int) -> int:
    """Query rows per split-reduce program: a power of two that brings the programs down to about
    ``programs`` (two waves of SMs), within :data:`REDUCE_TILE` partials a program. RetroAttention's
    window multiplies the rows by w (2,048 at w = 8, batch 8, H = 32), which one row a program ran
    as 2,048 programs of one [splits, D] tile each."""
    per_program = max(1, rows // max(1, programs))
    most = max(1, REDUCE_TILE // (next_pow2(splits) * next_pow2(d)))
    return max(1, min(1 << (per_program.bit_length() - 1), most))


def default_num_splits(q: torch.Tensor, num_sel_heads: int, num_tokens: int, row_blocks: int = 1) -> int:
    """Splits so that B * H_sel * splits programs fill the device, each with >= MIN_TOKENS_PER_SPLIT keys:
    the most splits whose programs fit three waves of SMs (on CUDA; 6 programs under the interpreter).

    It was two waves rounded up (5 splits at batch 8, where a split is 64 programs): on the H200 at
    batch 8 and 2,048 keys, 6 splits took 27.5 us at 1 row a program and 38.1 at 32 rows, 5 splits
    28.6 and 41.1 (results/bench/kernels_b8.md)."""
    programs = q.shape[0] * num_sel_heads * row_blocks
    want = (3 * target_programs(q) // 2) // programs
    most = max(1, -(-num_tokens // MIN_TOKENS_PER_SPLIT))
    return max(1, min(want, most, MAX_SPLITS))


def sparse_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    pages: torch.Tensor,
    q_pos: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    page_step: torch.Tensor | None = None,
    q_step: torch.Tensor | None = None,
    num_units: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    in_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the selected units of a paged KV cache (Triton; CUDA or the interpreter).

    Parameters
    ----------
    q : ``[B, H, S, D]`` queries (bf16/fp16/fp32).
    k_cache, v_cache : ``[N_pages, P, H_kv, D]`` physical pages of one layer (keys post-RoPE); a
        token view ``[N_pages * P, 1, H_kv, D]`` makes every unit one token.
    page_table : ``[B, n_max]`` int, logical unit -> physical unit.
    pages : ``[B, H_sel, K]`` int logical units each selection head attends; -1 = padding (anywhere);
        entries unique. ``H_sel`` is H_kv (one list per KV head) or H (one per query head); any
        stride works, so a ``[B, 1, K]`` list expanded over KV heads costs no copy.
    q_pos : ``[B, S]`` int query positions (causal: key t visible iff ``t <= q_pos``; -1 sees nothing).
    scaling : softmax scale.
    key_mask : optional ``[B, H_kv, n_max*P]`` bool, False = key hidden (any strides in the first
        two dims, e.g. one live mask expanded over heads).
    page_step, q_step : optional ``[B, H_sel, >= n_max]`` / ``[B, S]`` int: unit u visible to query s
        iff ``page_step[b, sel, u] < q_step[b, s]`` (RetroAttention; INT32_MAX sees every unit).
    num_units : optional ``[B]`` int: only the first ``num_units[b]`` entries of each list are read
        (lists compacted to the front; the split-K shares are sized by it, per sequence).
    num_splits : split-K factor (default: fill the device, see :func:`default_num_splits`).
    config : launch settings for benchmarks (``bench kernels``): ``max_block_m``, ``block_n``,
        ``num_warps``, ``num_stages``, ``reduce_rows`` (query rows a split-reduce program merges;
        default :func:`reduce_rows`); default :func:`launch_settings`.
    in_order : the caller's promise that every list is every unit in order (``pages[b, h, i] = i``
        for ``i < num_units[b]``: a dense selection), so a program stops at its rows' last query
        position instead of walking (and masking) the causally hidden rest: half the work of a
        causal prefill chunk. The result is the same either way.

    Returns
    -------
    out ``[B, H, S, D]`` in q.dtype (a view of ``[B, S, H, D]`` memory: ``out.transpose(1, 2)`` is
    contiguous) and lse ``[B, H, S]`` fp32 natural log; a query that sees no key gets 0 and -inf.
    No host synchronisation (CUDA-graph capturable).
    """
    _check(q, k_cache, v_cache, page_table, pages, q_pos, key_mask, page_step, q_step, num_units)
    require_triton(q, "sparse_paged_attention")
    B, H, S, D = q.shape
    _, P, H_kv, _ = k_cache.shape
    H_sel = pages.shape[1]
    G, G_sel = H // H_kv, H // H_sel
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("pages", pages)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    K_units = pages.shape[2]
    num_tokens = K_units * P
    max_block_m = (config or {}).get("max_block_m", DEFAULT_LAUNCH["max_block_m"])
    block_m = min(max(16, next_pow2(G_sel * S)), max_block_m)
    row_blocks = -(-(G_sel * S) // block_m)
    splits = num_splits if num_splits is not None else default_num_splits(q, H_sel, num_tokens, row_blocks)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    cfg = launch_settings(G_sel * S, -(-num_tokens // splits), config)

    # out is a [B, H, S, D] view of [B, S, H, D] memory: the layer's output layout, so the engine's
    # transpose back to [B, S, H, D] copies nothing when S > 1 (RetroAttention's window rows)
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    if splits == 1:
        part_out, part_lse = out, lse
        so = (*out.stride()[:3], 0)
        sl = (*lse.stride(), 0)
    else:
        part_out = torch.empty(B, H, S, splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, H, S, splits, dtype=torch.float32, device=q.device)
        so = part_out.stride()[:4]
        sl = part_lse.stride()
    has_mask, has_step, has_units = key_mask is not None, page_step is not None, num_units is not None
    if has_mask and key_mask.stride(-1) != 1:
        key_mask = key_mask.contiguous()
    km = key_mask.view(torch.uint8) if has_mask else pages  # dummy pointer when absent
    ps = page_step if has_step else pages
    if has_step and ps.stride(-1) != 1:
        ps = ps.contiguous()
    qs = q_step if has_step else q_pos
    nu = num_units if has_units else q_pos
    grid = (B * H_sel, splits, row_blocks)
    _sparse_paged_attention_kernel[grid](
        q, k_cache, v_cache, page_table, pages, nu, q_pos, km, ps, qs, part_out, part_lse,
        scaling * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), pages.stride(0), pages.stride(1), q_pos.stride(0),
        km.stride(0) if has_mask else 0, km.stride(1) if has_mask else 0,
        ps.stride(0) if has_step else 0, ps.stride(1) if has_step else 0, qs.stride(0),
        *so, *sl,
        H_sel, S, D, K_units, splits,
        G=G, G_SEL=G_sel, P=P, ALIGN=min(P, cfg["block_n"]),
        BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_D=max(16, next_pow2(D)),
        HAS_NUM_UNITS=has_units, HAS_KEY_MASK=has_mask, HAS_PAGE_STEP=has_step, IN_ORDER=in_order,
        DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if splits > 1:
        rows = B * H * S
        block_r = cfg.get("reduce_rows") or reduce_rows(rows, splits, D, target_programs(q))
        _reduce_splits_kernel[(triton.cdiv(rows, block_r),)](
            part_out, part_lse, out, lse, rows, splits, D, H, S, out.stride(0), out.stride(1), out.stride(2),
            BLOCK_R=block_r, BLOCK_SPLITS=next_pow2(splits), BLOCK_D=next_pow2(D), num_warps=4,
        )  # fmt: skip
    return out, lse


def sparse_paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    pages: torch.Tensor,
    q_pos: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    page_step: torch.Tensor | None = None,
    q_step: torch.Tensor | None = None,
    num_units: torch.Tensor | None = None,
    num_splits: int | None = None,
    in_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`sparse_paged_attention`: gather the selected keys, build the boolean mask
    from its definition, and run ``attention_ref`` (fp32). ``num_splits`` and ``in_order`` (a promise
    about the lists that changes no result) are ignored."""
    _check(q, k_cache, v_cache, page_table, pages, q_pos, key_mask, page_step, q_step, num_units)
    B, H, S, D = q.shape
    _, P, H_kv, _ = k_cache.shape
    if num_units is not None:  # nothing past the longest count is read (the reference may sync)
        pages = pages[..., : max(1, min(pages.shape[2], int(num_units.max())))]
    H_sel, K = pages.shape[1], pages.shape[2]
    G_sel = H // H_sel
    kv_of_sel = torch.arange(H_sel, device=q.device) * G_sel // (H // H_kv)  # [H_sel]
    units = pages.long()
    valid = units >= 0
    if num_units is not None:
        valid &= torch.arange(K, device=q.device).view(1, 1, K) < num_units.view(B, 1, 1).long()
    units = torch.where(valid, units, torch.zeros_like(units))
    phys = torch.gather(page_table.long().unsqueeze(1).expand(B, H_sel, -1), 2, units)  # [B, H_sel, K]
    slots = torch.arange(P, device=q.device)
    positions = (units.unsqueeze(-1) * P + slots).reshape(B, H_sel, K * P)  # key position per entry
    if H_sel == H_kv and pages.stride(1) == 0:  # one list shared by every KV head: gather whole pages once
        keys = k_cache[phys[:, 0]].reshape(B, K * P, H_kv, D).transpose(1, 2)
        values = v_cache[phys[:, 0]].reshape(B, K * P, H_kv, D).transpose(1, 2)
    else:  # a list per selection head: gather each head's keys from its KV head
        kv_idx = kv_of_sel.view(1, H_sel, 1, 1).expand(B, H_sel, K, P)
        keys = k_cache[phys.unsqueeze(-1).expand(B, H_sel, K, P), slots.expand(B, H_sel, K, P), kv_idx]
        values = v_cache[phys.unsqueeze(-1).expand(B, H_sel, K, P), slots.expand(B, H_sel, K, P), kv_idx]
        keys, values = keys.reshape(B, H_sel, K * P, D), values.reshape(B, H_sel, K * P, D)

    mask = valid.repeat_interleave(P, dim=2).unsqueeze(2)  # [B, H_sel, 1, K*P]
    mask = mask & (positions.unsqueeze(2) <= q_pos.long().view(B, 1, S, 1))
    if key_mask is not None:
        kv_mask = key_mask[torch.arange(B, device=q.device).view(B, 1, 1), kv_of_sel.view(1, H_sel, 1), positions]
        mask = mask & kv_mask.unsqueeze(2)
    if page_step is not None:
        steps = torch.gather(page_step.long(), 2, units).repeat_interleave(P, dim=2)  # [B, H_sel, K*P]
        mask = mask & (steps.unsqueeze(2) < q_step.long().view(B, 1, S, 1))
    outs, lses = [], []
    for b in range(B):  # attention_ref per sequence, each selection head acting as one KV head
        out, lse = attention_ref(q[b], keys[b].transpose(0, 1), values[b].transpose(0, 1), scaling, mask[b])
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)
