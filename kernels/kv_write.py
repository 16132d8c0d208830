"""Write a forward's keys and values into the paged cache at their positions (append or overwrite).

Position t of sequence b lives in logical page t // P, slot t % P; the page table maps the logical
page to a physical one. RetroAttention's re-run tokens overwrite their earlier K/V this way.

* ``write_kv`` (Triton): one launch stores both K and V; a program copies a block of tokens, each
  token's ``[H_kv, D]`` keys and values as one flat row (the source in any strides: the projection's
  head-split view needs no copy). PyTorch's indexed store takes one kernel for K and one for V, in
  every layer of every step. Graph-capturable, no host synchronisation.
* ``write_kv_ref``: sequence by sequence, by advanced indexing.

Positions < 0 are skipped by the kernel (padding rows of a static-shape batch); the reference
expects positions >= 0.
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, next_pow2, require_triton, tl, triton

TILE = 4096  # token x (head x channel) elements per program: Llama-3.1-8B (8 x 128) writes 4 tokens

if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(
        K, V, Kc, Vc, PageTable, Positions, Slots, S, H_kv, D,
        sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
        sc_n, sc_h, svc_n, svc_h, s_ptb, s_posb, s_slb,
        P: tl.constexpr, HAS_SLOTS: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (b, block of tokens): ``[BLOCK_S, BLOCK_H·BLOCK_D]`` keys and values to their cache slots."""
        b = tl.program_id(0)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        hd = tl.arange(0, BLOCK_H * BLOCK_D)
        h = hd // BLOCK_D
        d = hd % BLOCK_D
        pos = tl.load(Positions + b * s_posb + s, mask=s < S, other=-1).to(tl.int64)
        ok = pos >= 0
        if HAS_SLOTS:
            slot = tl.load(Slots + b * s_slb + s, mask=ok, other=0).to(tl.int64)
        else:
            page = tl.load(PageTable + b * s_ptb + pos // P, mask=ok, other=0).to(tl.int64)
            slot = page * P + pos % P
        m = ok[:, None] & ((h < H_kv) & (d < D))[None, :]
        k = tl.load(K + b * sk_b + s[:, None] * sk_s + (h * sk_h + d * sk_d)[None, :], mask=m)
        tl.store(Kc + slot[:, None] * sc_n + (h * sc_h + d)[None, :], k.to(Kc.dtype.element_ty), mask=m)
        v = tl.load(V + b * sv_b + s[:, None] * sv_s + (h * sv_h + d * sv_d)[None, :], mask=m)
        tl.store(Vc + slot[:, None] * svc_n + (h * svc_h + d)[None, :], v.to(Vc.dtype.element_ty), mask=m)


def _check(k_cache, v_cache, page_table, positions, k, v) -> None:
    if k_cache.shape != v_cache.shape or k.shape != v.shape:
        raise ValueError("k_cache/v_cache and k/v must have equal shapes")
    B, H_kv, S, D = k.shape
    if tuple(k_cache.shape[2:]) != (H_kv, D) or tuple(positions.shape) != (B, S) or page_table.shape[0] != B:
        raise ValueError(
            f"k [B, H_kv, S, D] = {tuple(k.shape)} must match k_cache [N, P, H_kv, D] = {tuple(k_cache.shape)}, "
            f"positions [B, S] = {tuple(positions.shape)} and page_table [B, n_max]"
        )


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor | None = None,
) -> None:
    """Store ``k, v [B, H_kv, S, D]`` (any strides) at ``positions [B, S]`` of ``k_cache, v_cache
    [N, P, H_kv, D]`` (Triton; CUDA or the interpreter). Positions < 0 are skipped.

    ``slots [B, S]`` int, optional: the flat physical slots ``page_table[b, t // P] * P + t % P`` of
    the positions, when the caller computed them once for every layer of a forward.
    """
    _check(k_cache, v_cache, page_table, positions, k, v)
    require_triton(k, "write_kv")
    N, P, H_kv, D = k_cache.shape
    B, _, S, _ = k.shape
    if B * S == 0:
        return None
    if any(c.stride(-1) != 1 or c.stride(0) != P * c.stride(1) for c in (k_cache, v_cache)):
        raise ValueError("write_kv: k_cache and v_cache must be [N, P, H_kv, D] with pages of P contiguous slots")
    positions = positions.contiguous()
    page_table = page_table.contiguous()
    slots_t = positions if slots is None else slots.contiguous()  # unread without slots
    block_h, block_d = next_pow2(H_kv), next_pow2(D)
    block_s = max(1, min(next_pow2(S), TILE // (block_h * block_d)))
    _write_kv_kernel[(B, triton.cdiv(S, block_s))](
        k, v, k_cache, v_cache, page_table, positions, slots_t, S, H_kv, D,
        *k.stride(), *v.stride(),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), positions.stride(0), slots_t.stride(0),
        P=P, HAS_SLOTS=slots is not None, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return None


def write_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor | None = None,
) -> None:
    """Reference: sequence by sequence, each token to (page_table[t // P], t % P) (``slots`` unused)."""
    _check(k_cache, v_cache, page_table, positions, k, v)
    P = k_cache.shape[1]
    for b in range(positions.shape[0]):
        t = positions[b].long()
        pages = page_table[b].long()[t // P]
        k_cache[pages, t % P] = k[b].transpose(0, 1).to(k_cache.dtype)
        v_cache[pages, t % P] = v[b].transpose(0, 1).to(v_cache.dtype)
