"""Exact per-page key min/max (Quest metadata) refreshed on device after a cache write.

After a forward writes keys at ``positions`` (appends, and RetroAttention's overwrites of its
window), the min/max of every touched page is recomputed from the page's stored keys over its
slots below the sequence length: exact after every append and overwrite (an incremental min/max
would be wrong after an overwrite). One program per (b, s, block of KV heads: a tile of at most
``TILE`` channels, so Llama-3.1-8B's 8 heads of 128 at page 16 take two programs). A program
reads its page only when the position before it in the row is on another page (or is padding),
so a run of positions on one page (a prefill chunk, RetroAttention's window) costs one page read,
by its first position; other duplicates compute the same values, which is harmless. Positions
< 0 are skipped (padding rows of a static-shape batch).
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, MAX, MIN, next_pow2, require_triton, tl, triton

TILE = 8192  # page slots x (heads x channels) one program reduces

if HAS_TRITON:

    @triton.jit
    def _update_page_minmax_kernel(
        Kc, Kmin, Kmax, PageTable, Positions, Lengths,
        stride_kn, stride_kp, stride_kh,
        stride_mn, stride_mh, stride_xn, stride_xh,
        stride_ptb, stride_posb,
        S, H_kv, D,
        P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (b·S + s, block of KV heads): the page's ``[P, BLOCK_H·BLOCK_D]`` keys, reduced over slots."""
        pid = tl.program_id(0)
        b = pid // S
        s = pid % S
        pos = tl.load(Positions + b * stride_posb + s)
        prev = tl.load(Positions + b * stride_posb + s - 1, mask=s > 0, other=-1)
        lp = pos // P
        if (pos >= 0) & ((prev < 0) | (prev // P != lp)):  # C division: -1 // P is 0, so padding is tested apart
            phys = tl.load(PageTable + b * stride_ptb + lp).to(tl.int64)
            length = tl.load(Lengths + b)
            slot = tl.arange(0, P)
            hd = tl.arange(0, BLOCK_H * BLOCK_D)  # (head, channel) flattened: one 2-D tile for a block of heads
            h = tl.program_id(1) * BLOCK_H + hd // BLOCK_D
            d = hd % BLOCK_D
            hd_ok = (h < H_kv) & (d < D)
            live = (lp * P + slot) < length
            keys = tl.load(Kc + phys * stride_kn + slot[:, None] * stride_kp + (h * stride_kh + d)[None, :],
                           mask=live[:, None] & hd_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
            lo = tl.reduce(tl.where(live[:, None], keys, float("inf")), 0, MIN)
            hi = tl.reduce(tl.where(live[:, None], keys, float("-inf")), 0, MAX)
            tl.store(Kmin + phys * stride_mn + h * stride_mh + d, lo.to(Kmin.dtype.element_ty), mask=hd_ok)
            tl.store(Kmax + phys * stride_xn + h * stride_xh + d, hi.to(Kmax.dtype.element_ty), mask=hd_ok)


def _check(k_cache, kmin, kmax, page_table, positions, lengths) -> None:
    N_pages, P, H_kv, D = k_cache.shape
    if kmin.shape != (N_pages, H_kv, D) or kmax.shape != kmin.shape:
        raise ValueError(f"kmin/kmax must be [N_pages, H_kv, D] = [{N_pages}, {H_kv}, {D}], got {tuple(kmin.shape)}")
    if P & (P - 1):
        raise ValueError(f"page size {P} is not a power of two")
    B = page_table.shape[0]
    if positions.dim() != 2 or positions.shape[0] != B or tuple(lengths.shape) != (B,):
        raise ValueError("positions must be [B, S] and lengths [B], with B = page_table.shape[0]")


def update_page_minmax(
    k_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Recompute, in place, ``kmin``/``kmax`` of every page holding one of ``positions`` (Triton; CUDA or the interpreter).

    Parameters
    ----------
    k_cache : ``[N_pages, P, H_kv, D]`` keys of one layer (already written).
    kmin, kmax : ``[N_pages, H_kv, D]`` updated in place (a page with no slot below the length
        gets +inf / -inf).
    page_table : ``[B, n_max]`` int32. positions : ``[B, S]`` int32/int64 (< 0 = skip).
    lengths : ``[B]`` tokens of each sequence after the write.
    """
    _check(k_cache, kmin, kmax, page_table, positions, lengths)
    require_triton(k_cache, "update_page_minmax")
    _, P, H_kv, D = k_cache.shape
    B, S = positions.shape
    if k_cache.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride(-1) != 1:
        raise ValueError("k_cache, kmin and kmax must be contiguous in their last dimension")
    page_table, positions, lengths = page_table.contiguous(), positions.contiguous(), lengths.contiguous()
    if B * S == 0:
        return None
    block_d = next_pow2(D)
    block_h = max(1, min(next_pow2(H_kv), TILE // (P * block_d)))
    _update_page_minmax_kernel[(B * S, triton.cdiv(H_kv, block_h))](
        k_cache, kmin, kmax, page_table, positions, lengths,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        kmin.stride(0), kmin.stride(1), kmax.stride(0), kmax.stride(1),
        page_table.stride(0), positions.stride(0),
        S, H_kv, D, P=P, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return None


def update_page_minmax_ref(
    k_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Reference: per position, the page's keys in the slots below the length, then their channel
    min and max (+inf / -inf for a page with no such slot); positions < 0 are skipped."""
    _check(k_cache, kmin, kmax, page_table, positions, lengths)
    P = k_cache.shape[1]
    B = positions.shape[0]
    pos = positions.long()
    keep = pos >= 0
    page = torch.where(keep, pos, torch.zeros_like(pos)) // P  # [B, S]
    phys = torch.gather(page_table.long(), 1, page)
    slots = page.unsqueeze(-1) * P + torch.arange(P, device=pos.device)  # [B, S, P]
    live = (slots < lengths.long().view(B, 1, 1))[..., None, None]
    keys = k_cache[phys]  # [B, S, P, H_kv, D]
    inf = torch.tensor(float("inf"), dtype=k_cache.dtype, device=k_cache.device)
    lo = torch.where(live, keys, inf).amin(dim=2)
    hi = torch.where(live, keys, -inf).amax(dim=2)
    kmin[phys[keep]] = lo[keep].to(kmin.dtype)  # duplicate pages carry identical values
    kmax[phys[keep]] = hi[keep].to(kmax.dtype)
