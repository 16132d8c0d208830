"""Write a forward's keys and values into the paged cache at their positions (append or overwrite).

Position t of sequence b lives in logical page t // P, slot t % P; the page table maps the logical
page to a physical one. RetroAttention's re-run tokens overwrite their earlier K/V this way.
``write_kv`` is one vectorised scatter (no kernel of its own is needed: it moves only the new
tokens' bytes; graph-capturable, no host synchronisation); ``write_kv_ref`` writes sequence by sequence.
"""

from __future__ import annotations

import torch


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
    """Store ``k, v [B, H_kv, S, D]`` at ``positions [B, S]`` (>= 0) of ``k_cache, v_cache [N, P, H_kv, D]``.

    ``slots [B, S]`` long, optional: the flat physical slots ``page_table[b, t // P] * P + t % P`` of
    the positions, when the caller computed them once for every layer of a forward.
    """
    _check(k_cache, v_cache, page_table, positions, k, v)
    N, P, H_kv, D = k_cache.shape
    if slots is None:
        pos = positions.long()
        slots = torch.gather(page_table.long(), 1, pos // P) * P + pos % P  # [B, S]
    k_cache.view(N * P, H_kv, D)[slots] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache.view(N * P, H_kv, D)[slots] = v.transpose(1, 2).to(v_cache.dtype)


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
