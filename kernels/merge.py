"""Merge two attention states over disjoint key sets (one launch; anchors-methods.md §4.4).

``m = max(s_a, s_b)``, ``w = e^{s - m}``, ``o = (w_a o_a + w_b o_b) / (w_a + w_b)``,
``s = m + log(w_a + w_b)``, with LSEs in natural log. An empty side (LSE = -inf) has weight 0;
both empty gives o = 0 and s = -inf. Used by RetroAttention to fold a past token's supplementary
attention into its cached output. The reference is ``attention_ref.merge_states_ref``.
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, next_pow2, require_triton, tl, triton
from retrobench.kernels.attention_ref import merge_states_ref as _merge_states_ref

BLOCK_ROWS = 16

if HAS_TRITON:

    @triton.jit
    def _merge_states_kernel(
        OutA, LseA, OutB, LseB, Out, Lse, R, D,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Rows are contiguous ``[R, D]`` outputs and ``[R]`` LSEs."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        r_ok = r < R
        m2 = r_ok[:, None] & (d[None, :] < D)
        sa = tl.load(LseA + r, mask=r_ok, other=float("-inf")).to(tl.float32)
        sb = tl.load(LseB + r, mask=r_ok, other=float("-inf")).to(tl.float32)
        m = tl.maximum(sa, sb)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(sa - m_ref)
        wb = tl.exp(sb - m_ref)
        total = wa + wb
        denom = tl.where(total > 0, total, 1.0)
        offs = r.to(tl.int64)[:, None] * D + d[None, :]
        oa = tl.load(OutA + offs, mask=m2, other=0.0).to(tl.float32)
        ob = tl.load(OutB + offs, mask=m2, other=0.0).to(tl.float32)
        out = (wa[:, None] * oa + wb[:, None] * ob) / denom[:, None]
        tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=m2)
        tl.store(Lse + r, tl.where(total > 0, m_ref + tl.log(denom), float("-inf")), mask=r_ok)


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """State over the union of two disjoint key sets (Triton; CUDA or the interpreter).

    Parameters
    ----------
    out_a, out_b : ``[..., D]`` normalised outputs (any float dtype, same shape).
    lse_a, lse_b : ``[...]`` natural-log LSEs (-inf = empty).

    Returns
    -------
    ``out [..., D]`` in out_a.dtype and ``lse [...]`` fp32.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"shapes do not match: out {tuple(out_a.shape)}/{tuple(out_b.shape)}, "
                         f"lse {tuple(lse_a.shape)}/{tuple(lse_b.shape)}")  # fmt: skip
    require_triton(out_a, "merge_states")
    D = out_a.shape[-1]
    R = lse_a.numel()
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
    if R == 0:
        return out, lse
    _merge_states_kernel[(triton.cdiv(R, BLOCK_ROWS),)](
        out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(), lse_b.contiguous(), out, lse, R, D,
        BLOCK_R=BLOCK_ROWS, BLOCK_D=next_pow2(D), num_warps=4,
    )  # fmt: skip
    return out, lse


def merge_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (``attention_ref.merge_states_ref``), with the LSE returned in fp32."""
    out, lse = _merge_states_ref(out_a, lse_a, out_b, lse_b)
    return out, lse.float()
