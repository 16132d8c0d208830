"""RetroAttention's per-layer bookkeeping on device, one launch each (``methods/retro.py``).

After the current token's selection and its one sparse-attention call (current row plus the past
rows of the window), a retro layer has two pieces of upkeep:

* ``mark_loaded``: for every selected unit, read the step it was last loaded (``A``; the past rows'
  supplement accounting needs it) and set it to the current step. Entries are unique per list,
  so the kernel's writes never collide; padding (-1) entries read -1 and change nothing.
* ``retro_merge``: fold each past row's supplementary attention into that token's cached
  (output, LSE) by log-sum-exp weights, write the merged state back to the cache and into the
  layer's output (it flows through o_proj), and keep the current row's state for the cache's
  next slot. The cache is a ring: the token generated at step t lives in slot ``t mod slots``,
  so a step moves no slot (a shift copied the whole cache twice a step: 56 us at w = 8, batch 8).

``retro_upkeep`` does both in one launch (the engine's path when the window has past rows): at
w = 2, batch 8, 32K on the H200 the two launches took 4.4 us a layer together, the one 2.7 us
(results/bench/profile_b8.csv). It can write ``seen`` straight into a caller's buffer (the step's
accounting scratch), sparing a copy.

In PyTorch these are about fifteen small kernels per layer (gather, clamp, where, scatter, the
merge, slice copies, casts, concatenations). The references ``*_ref`` are the definition, in
plain tensor ops; tests compare both on fresh random inputs. All functions work in place.
"""

from __future__ import annotations

import torch
from retrobench.kernels._triton import HAS_TRITON, next_pow2, require_triton, tl, triton
from retrobench.kernels.attention_ref import merge_states_ref

MERGE_HEADS = 8  # heads per retro_merge program (a [8, D] tile; H = 32 takes four programs per row)

if HAS_TRITON:

    @triton.jit
    def _mark_units(
        row, kblock, A, Units, Step, Seen, H_sel, K,
        stride_ab, stride_ah, stride_ub, stride_uh, stride_sb, stride_sh,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """List entries ``kblock * BLOCK_K ...`` of row (b, selection head) ``row``."""
        b = row // H_sel
        h = row % H_sel
        k = kblock * BLOCK_K + tl.arange(0, BLOCK_K)
        u = tl.load(Units + b * stride_ub + h * stride_uh + k, mask=k < K, other=-1)
        valid = (k < K) & (u >= 0)
        a = A + b * stride_ab + h * stride_ah + u
        seen = tl.load(a, mask=valid, other=-1)
        tl.store(Seen + b * stride_sb + h * stride_sh + k, seen, mask=k < K)
        step = tl.load(Step + b).to(seen.dtype)
        tl.store(a, tl.zeros([BLOCK_K], seen.dtype) + step, mask=valid)

    @triton.jit
    def _merge_rows(
        pid, hblock, Step, Out, Lse, CacheOut, CacheLse, CurOut, CurLse,
        H, S, slots, D,
        so_b, so_h, so_s, sl_b, sl_h,
        sco_b, sco_s, sco_h, scl_b, scl_s,
        scu_b, scu_h, scul_b,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Row (b·S + s, block of heads): row s < S-1 (the token of step ``step[b] - (S-1) + s``)
        merges into cache slot ``(step[b] - (S-1) + s) mod slots``; row S-1 is kept. LSE tensors are
        contiguous over heads."""
        b = pid // S
        s = pid % S
        h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        h_ok = h < H
        hd = h_ok[:, None] & (d[None, :] < D)
        out = Out + b * so_b + h[:, None] * so_h + s * so_s + d[None, :]
        o = tl.load(out, mask=hd, other=0.0).to(tl.float32)
        lse_p = Lse + b * sl_b + h * sl_h + s
        lse = tl.load(lse_p, mask=h_ok, other=float("-inf")).to(tl.float32)
        if s < S - 1:
            slot = (tl.load(Step + b) - (S - 1) + s) % slots
            slot = (slot + slots) % slots  # a floor modulo, whatever the sign convention of %
            co = CacheOut + b * sco_b + slot * sco_s + h[:, None] * sco_h + d[None, :]
            cl = CacheLse + b * scl_b + slot * scl_s + h
            oa = tl.load(co, mask=hd, other=0.0).to(tl.float32)
            sa = tl.load(cl, mask=h_ok, other=float("-inf")).to(tl.float32)
            m = tl.maximum(sa, lse)
            m_ref = tl.where(m == float("-inf"), 0.0, m)
            wa = tl.exp(sa - m_ref)
            wb = tl.exp(lse - m_ref)
            total = wa + wb
            denom = tl.where(total > 0, total, 1.0)
            merged = (wa[:, None] * oa + wb[:, None] * o) / denom[:, None]
            merged_lse = tl.where(total > 0, m_ref + tl.log(denom), float("-inf"))
            tl.store(co, merged, mask=hd)
            tl.store(cl, merged_lse, mask=h_ok)
            tl.store(out, merged.to(Out.dtype.element_ty), mask=hd)
            tl.store(lse_p, merged_lse, mask=h_ok)
        else:
            tl.store(CurOut + b * scu_b + h[:, None] * scu_h + d[None, :], o, mask=hd)
            tl.store(CurLse + b * scul_b + h, lse, mask=h_ok)

    @triton.jit
    def _mark_loaded_kernel(
        A, Units, Step, Seen, H_sel, K,
        stride_ab, stride_ah, stride_ub, stride_uh, stride_sb, stride_sh,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, selection head, block of list entries)."""
        _mark_units(tl.program_id(0), tl.program_id(1), A, Units, Step, Seen, H_sel, K,
                    stride_ab, stride_ah, stride_ub, stride_uh, stride_sb, stride_sh, BLOCK_K)  # fmt: skip

    @triton.jit
    def _retro_merge_kernel(
        Step, Out, Lse, CacheOut, CacheLse, CurOut, CurLse,
        H, S, slots, D,
        so_b, so_h, so_s, sl_b, sl_h,
        sco_b, sco_s, sco_h, scl_b, scl_s,
        scu_b, scu_h, scul_b,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (b·S + s, block of heads)."""
        _merge_rows(tl.program_id(0), tl.program_id(1), Step, Out, Lse, CacheOut, CacheLse, CurOut, CurLse,
                    H, S, slots, D, so_b, so_h, so_s, sl_b, sl_h, sco_b, sco_s, sco_h, scl_b, scl_s,
                    scu_b, scu_h, scul_b, BLOCK_H, BLOCK_D)  # fmt: skip

    @triton.jit
    def _retro_upkeep_kernel(
        A, Units, Step, Seen, H_sel, K,
        stride_ab, stride_ah, stride_ub, stride_uh, stride_sb, stride_sh,
        Out, Lse, CacheOut, CacheLse, CurOut, CurLse,
        H, S, slots, D,
        so_b, so_h, so_s, sl_b, sl_h,
        sco_b, sco_s, sco_h, scl_b, scl_s,
        scu_b, scu_h, scul_b,
        MERGE_PROGRAMS, H_BLOCKS, K_BLOCKS,
        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """The first MERGE_PROGRAMS programs merge (B·S rows x H_BLOCKS), the rest mark (B·H_sel rows
        x K_BLOCKS): the two touch disjoint memory."""
        pid = tl.program_id(0)
        if pid < MERGE_PROGRAMS:
            _merge_rows(pid // H_BLOCKS, pid % H_BLOCKS, Step, Out, Lse, CacheOut, CacheLse, CurOut, CurLse,
                        H, S, slots, D, so_b, so_h, so_s, sl_b, sl_h, sco_b, sco_s, sco_h, scl_b, scl_s,
                        scu_b, scu_h, scul_b, BLOCK_H, BLOCK_D)  # fmt: skip
        else:
            m = pid - MERGE_PROGRAMS
            _mark_units(m // K_BLOCKS, m % K_BLOCKS, A, Units, Step, Seen, H_sel, K,
                        stride_ab, stride_ah, stride_ub, stride_uh, stride_sb, stride_sh, BLOCK_K)  # fmt: skip


def ring_slots(step: torch.Tensor, past: int, slots: int) -> torch.Tensor:
    """``[B, past]`` output-cache slots of the ``past`` tokens before ``step [B]``, oldest first: the
    token of step t lives in slot ``t mod slots`` (a floor modulo: rows before step 0 land on slots no
    live token holds)."""
    return (step.view(-1, 1).long() - past + torch.arange(past, device=step.device)) % slots


def _check_mark(last_loaded: torch.Tensor, units: torch.Tensor, step: torch.Tensor, seen: torch.Tensor | None) -> None:
    if last_loaded.dim() != 3 or units.dim() != 3 or units.shape[:2] != last_loaded.shape[:2]:
        raise ValueError(f"last_loaded must be [B, H_sel, U] and units [B, H_sel, K], got "
                         f"{tuple(last_loaded.shape)} and {tuple(units.shape)}")  # fmt: skip
    if tuple(step.shape) != (units.shape[0],):
        raise ValueError(f"step must be [B], got {tuple(step.shape)}")
    if seen is not None and (seen.shape != units.shape or seen.dtype != last_loaded.dtype):
        raise ValueError(f"seen must be {tuple(units.shape)} {last_loaded.dtype}, got {tuple(seen.shape)} {seen.dtype}")


def _mark_args(last_loaded, units, step, seen) -> tuple[torch.Tensor, tuple, int, int]:
    """Checked kernel arguments of the marking part: (seen, args, BLOCK_K, K blocks)."""
    _check_mark(last_loaded, units, step, seen)
    require_triton(units, "mark_loaded")
    if seen is None:
        seen = torch.empty(units.shape, dtype=last_loaded.dtype, device=units.device)
    for name, t in (("last_loaded", last_loaded), ("units", units), ("seen", seen)):
        if t.stride(-1) != 1:
            raise ValueError(f"mark_loaded: {name} must be contiguous in its last dimension")
    B, H_sel, K = units.shape
    block = min(1024, max(16, next_pow2(K)))
    args = (last_loaded, units, step.contiguous(), seen, H_sel, K, last_loaded.stride(0), last_loaded.stride(1),
            units.stride(0), units.stride(1), seen.stride(0), seen.stride(1))  # fmt: skip
    return seen, args, block, triton.cdiv(K, block)


def mark_loaded(
    last_loaded: torch.Tensor, units: torch.Tensor, step: torch.Tensor, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Read and set the last-loaded step of every selected unit, in place (Triton; CUDA or the interpreter).

    Parameters
    ----------
    last_loaded : ``[B, H_sel, U]`` int32 ``A`` (any strides but the last), updated in place.
    units : ``[B, H_sel, K]`` int unit lists, -1 = padding; entries unique per list.
    step : ``[B]`` int the current step.
    seen : optional ``[B, H_sel, K]`` buffer (last_loaded's dtype) to write the result into.

    Returns
    -------
    ``[B, H_sel, K]`` int32 (``seen`` when given): each entry's ``A`` before this call (-1 for padding).
    """
    seen, args, block, k_blocks = _mark_args(last_loaded, units, step, seen)
    _mark_loaded_kernel[(units.shape[0] * units.shape[1], k_blocks)](*args, BLOCK_K=block, num_warps=4)
    return seen


def mark_loaded_ref(
    last_loaded: torch.Tensor, units: torch.Tensor, step: torch.Tensor, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: gather the selected units' ``A`` (-1 for padding), then scatter the step into them
    (padding entries scatter the last column's own value back into it: a no-op)."""
    _check_mark(last_loaded, units, step, seen)
    u = units.long()
    valid = u >= 0
    before = torch.where(valid, torch.gather(last_loaded, 2, u.clamp(min=0)), -1).to(last_loaded.dtype)
    last = last_loaded.shape[2] - 1
    index = torch.where(valid, u, last)
    keep = last_loaded[:, :, last:].expand_as(index)
    src = torch.where(valid, step.view(-1, 1, 1).to(last_loaded.dtype).expand_as(index), keep)
    last_loaded.scatter_(2, index, src)
    if seen is None:
        return before
    return seen.copy_(before)


def _check_merge(out, lse, cache_out, cache_lse, cur_out, cur_lse, step) -> None:
    B, H, S, D = out.shape
    slots = cache_out.shape[1]
    if tuple(step.shape) != (B,):
        raise ValueError(f"retro_merge: step must be [B] = [{B}], got {tuple(step.shape)}")
    ok = (tuple(lse.shape) == (B, H, S) and cache_out.dim() == 4 and tuple(cache_out.shape) == (B, slots, H, D)
          and tuple(cache_lse.shape) == (B, slots, H) and tuple(cur_out.shape) == (B, H, D)
          and tuple(cur_lse.shape) == (B, H) and S - 1 <= slots)  # fmt: skip
    if not ok:
        raise ValueError(
            f"retro_merge: out [B, H, S, D] {tuple(out.shape)}, lse [B, H, S] {tuple(lse.shape)}, cache_out "
            f"[B, slots >= S-1, H, D] {tuple(cache_out.shape)}, cache_lse [B, slots, H] {tuple(cache_lse.shape)}, "
            f"cur_out [B, H, D] {tuple(cur_out.shape)}, cur_lse [B, H] {tuple(cur_lse.shape)}"
        )


def _merge_args(out, lse, cache_out, cache_lse, cur_out, cur_lse, step) -> tuple[tuple, int, int]:
    """Checked kernel arguments of the merging part (after ``Step``): (args, BLOCK_H, head blocks)."""
    _check_merge(out, lse, cache_out, cache_lse, cur_out, cur_lse, step)
    require_triton(out, "retro_merge")
    for name, t in (("out", out), ("cache_out", cache_out), ("cur_out", cur_out)):
        if t.stride(-1) != 1:
            raise ValueError(f"retro_merge: {name} must be contiguous in its last dimension")
    for name, t in (("lse", lse), ("cache_lse", cache_lse), ("cur_lse", cur_lse)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"retro_merge: {name} must be contiguous in its last dimension")
    B, H, S, D = out.shape
    block_h = min(MERGE_HEADS, next_pow2(H))
    args = (out, lse, cache_out, cache_lse, cur_out, cur_lse, H, S, cache_out.shape[1], D,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            cache_out.stride(0), cache_out.stride(1), cache_out.stride(2), cache_lse.stride(0), cache_lse.stride(1),
            cur_out.stride(0), cur_out.stride(1), cur_lse.stride(0))  # fmt: skip
    return args, block_h, triton.cdiv(H, block_h)


def retro_merge(
    out: torch.Tensor,
    lse: torch.Tensor,
    cache_out: torch.Tensor,
    cache_lse: torch.Tensor,
    cur_out: torch.Tensor,
    cur_lse: torch.Tensor,
    step: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the past rows' supplements into the output cache and keep the current row (Triton, in place).

    Parameters
    ----------
    out : ``[B, H, S, D]`` one layer's attention output (rows 0..S-2: the past tokens' supplements,
        row S-1: the current token); lse ``[B, H, S]`` fp32. Rows 0..S-2 are replaced by the merged
        states.
    cache_out : ``[B, slots, H, D]`` fp32, cache_lse ``[B, slots, H]`` fp32: the output cache, a ring
        (the token of step t in slot ``t mod slots``); past row s, the token of step
        ``step - (S-1) + s``, is slot ``(step - (S-1) + s) mod slots``; those slots are replaced by the
        merged states.
    cur_out : ``[B, H, D]`` fp32, cur_lse ``[B, H]`` fp32: receive row S-1.
    step : ``[B]`` int the current step (row S-1's).

    Returns
    -------
    ``(out, lse)``, the same tensors, updated.
    """
    args, block_h, h_blocks = _merge_args(out, lse, cache_out, cache_lse, cur_out, cur_lse, step)
    _retro_merge_kernel[(out.shape[0] * out.shape[2], h_blocks)](
        step.contiguous(), *args, BLOCK_H=block_h, BLOCK_D=next_pow2(out.shape[3]), num_warps=2
    )
    return out, lse


def retro_merge_ref(
    out: torch.Tensor,
    lse: torch.Tensor,
    cache_out: torch.Tensor,
    cache_lse: torch.Tensor,
    cur_out: torch.Tensor,
    cur_lse: torch.Tensor,
    step: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: :func:`merge_states_ref` of each past row with its cache slot, written to the cache
    and the output; the current row copied out. In place, like :func:`retro_merge`."""
    _check_merge(out, lse, cache_out, cache_lse, cur_out, cur_lse, step)
    B, _, S, _ = out.shape
    slots = cache_out.shape[1]
    if S > 1:
        b = torch.arange(B, device=out.device).view(B, 1)
        past = ring_slots(step, S - 1, slots)  # [B, S-1]
        m_out, m_lse = merge_states_ref(cache_out[b, past], cache_lse[b, past], out[:, :, :-1].transpose(1, 2).float(),
                                        lse[:, :, :-1].transpose(1, 2))  # fmt: skip
        cache_out[b, past] = m_out
        cache_lse[b, past] = m_lse.float()
        out[:, :, :-1] = m_out.transpose(1, 2).to(out.dtype)
        lse[:, :, :-1] = m_lse.transpose(1, 2).float()
    cur_out.copy_(out[:, :, -1])
    cur_lse.copy_(lse[:, :, -1])
    return out, lse


def retro_upkeep(
    last_loaded: torch.Tensor,
    units: torch.Tensor,
    step: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cache_out: torch.Tensor,
    cache_lse: torch.Tensor,
    cur_out: torch.Tensor,
    cur_lse: torch.Tensor,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`retro_merge` and :func:`mark_loaded` in one launch (Triton, in place); arguments as
    theirs. Returns ``seen`` (:func:`mark_loaded`'s result)."""
    seen, mark, block_k, k_blocks = _mark_args(last_loaded, units, step, seen)
    merge, block_h, h_blocks = _merge_args(out, lse, cache_out, cache_lse, cur_out, cur_lse, step)
    merge_programs = out.shape[0] * out.shape[2] * h_blocks
    grid = (merge_programs + units.shape[0] * units.shape[1] * k_blocks,)
    _retro_upkeep_kernel[grid](
        *mark, *merge, merge_programs, h_blocks, k_blocks,
        BLOCK_K=block_k, BLOCK_H=block_h, BLOCK_D=next_pow2(out.shape[3]), num_warps=4,
    )  # fmt: skip
    return seen


def retro_upkeep_ref(
    last_loaded: torch.Tensor,
    units: torch.Tensor,
    step: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cache_out: torch.Tensor,
    cache_lse: torch.Tensor,
    cur_out: torch.Tensor,
    cur_lse: torch.Tensor,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: :func:`retro_merge_ref`, then :func:`mark_loaded_ref` (they touch disjoint tensors)."""
    retro_merge_ref(out, lse, cache_out, cache_lse, cur_out, cur_lse, step)
    return mark_loaded_ref(last_loaded, units, step, seen)
