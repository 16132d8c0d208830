"""Plain-PyTorch reference attention over an explicit key set, returning output and natural-log LSE.

This is the obviously-correct definition every fast path is tested against: softmax attention of
grouped queries over keys selected by a boolean mask, computed in fp32. It also defines the
merge of two partial attention states over disjoint key sets (the primitive behind split-K
decoding, InfLLM's two-stage attention and RetroAttention's output-cache update).

Shapes (glossary in methods/base.py): q ``[H, S, D]``; k, v ``[T, H_kv, D]``; masks broadcast to
``[H_kv, S, T]``; outputs ``[H, S, D]`` and ``[H, S]``. H must be a multiple of H_kv (G = H / H_kv).
A query whose mask selects no key gets output 0 and LSE = -inf (the identity of the merge).
"""

from __future__ import annotations

import torch


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention.

    ``mask`` (bool, True = attend) is ``[H, S, T]`` (per query head), or broadcasts to
    ``[H_kv, S, T]`` (per KV head, shared by its G query heads).
    """
    H, S, D = q.shape
    T, H_kv, _ = k.shape
    G = H // H_kv
    qf = q.float().reshape(H_kv, G * S, D)
    scores = torch.bmm(qf, k.float().permute(1, 2, 0)).mul_(scaling).view(H_kv, G, S, T)
    if mask is not None:
        m = mask if mask.dim() == 3 else mask.reshape(1, *mask.shape[-2:])
        # [H, S, T] per query head, or [H_kv | 1, S, T] per KV head / shared
        m = m.view(H_kv, G, *m.shape[-2:]) if (m.shape[0] == H and G > 1) else m.unsqueeze(1)
        scores.masked_fill_(~m, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H_kv, G, S]
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores.sub_(lse_safe.unsqueeze(-1)))  # a fully masked row gives exp(-inf) = 0
    out = torch.bmm(probs.view(H_kv, G * S, T), v.float().transpose(0, 1)).view(H_kv, G, S, D)
    return out.reshape(H, S, D).to(q.dtype), lse.reshape(H, S)


def causal_mask(q_positions: torch.Tensor, num_keys: int, key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, T]`` bool: key j is visible to query i iff key position <= query position."""
    if key_positions is None:
        key_positions = torch.arange(num_keys, device=q_positions.device)
    return key_positions.unsqueeze(0) <= q_positions.unsqueeze(1)


def dense_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over all keys (key i sits at position i), optionally restricted by ``key_mask [T]``."""
    mask = causal_mask(q_positions, k.shape[0])
    if key_mask is not None:
        mask = mask & key_mask.unsqueeze(0)
    return attention_ref(q, k, v, scaling, mask.unsqueeze(0))


def merge_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint key sets into the state over their union.

    ``o = (e^{s_a-m} o_a + e^{s_b-m} o_b) / (e^{s_a-m} + e^{s_b-m})``, ``s = m + log(e^{s_a-m} + e^{s_b-m})``
    with ``m = max(s_a, s_b)``. Outputs ``[..., D]``, LSEs ``[...]``; an empty side has LSE = -inf.
    """
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (wa.unsqueeze(-1) * out_a.float() + wb.unsqueeze(-1) * out_b.float()) / denom.unsqueeze(-1)
    lse = torch.where(total > 0, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return out.to(out_a.dtype), lse
