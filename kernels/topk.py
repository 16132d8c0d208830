"""Top-k with an optional forced entry, at a static width, with a deterministic order.

Every selecting method ends in the same step: keep one forced entry (Quest's current page, the
oracle's current token) and the best ``k - 1`` others by score, or the best ``k`` when nothing is
forced (InfLLM's blocks). Entries scoring -inf (pages that do not exist or hold no key) are never
chosen. The result lists the forced entry first, then the others by descending score, equal scores
by ascending index, then -1 up to the static width ``k_max`` — the order of a stable descending
sort, so both implementations return identical lists, ties included.

``topk_forced`` (the fast op, used by ``engine.backend=triton``) needs no kernel of its own: it
packs each fp32 score and its index into one int64 key (the score's bits made order-preserving
in the high word, the complement of the index in the low word), so one ``torch.topk`` over
distinct keys returns the stable order exactly, with static shapes and no host synchronisation
(CUDA-graph capturable). ``topk_forced_ref`` is the definition: a stable sort.
"""

from __future__ import annotations

import torch

LOW_MASK = 0xFFFFFFFF


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
    """The forced entry plus the top ``k[b] - 1`` others (or the top ``k[b]``), static width ``k_max``.

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
