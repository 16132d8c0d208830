"""RetroAttention's bookkeeping kernels (``kernels/retro.py``) equal their references.

Both ops work in place, so each test runs the kernel and the reference on clones of the same fresh
random state and compares every tensor they touch. ``mark_loaded``: unique unit lists with padding
anywhere, lists shorter and longer than the block, into a caller's buffer too. ``retro_merge``:
windows w = 2..8 with S - 1 past rows (fewer rows than slots too), the ring's slots at any step
(steps before S - 1 too), empty cache slots (LSE -inf) and rows that saw nothing, odd head dims. ``retro_upkeep`` (both in one launch) against the two
references. Fresh seed per test, printed on failure.
"""

from __future__ import annotations

import pytest
import torch

from retrobench.kernels._testing import assert_close, fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.retro import (
    mark_loaded,
    mark_loaded_ref,
    retro_merge,
    retro_merge_ref,
    retro_upkeep,
    retro_upkeep_ref,
    ring_slots,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def unit_lists(B: int, H_sel: int, K: int, U: int, device: str) -> torch.Tensor:
    """Unique units per list, -1 scattered among them."""
    units = torch.stack([torch.stack([torch.randperm(U)[:K] for _ in range(H_sel)]) for _ in range(B)])
    units[torch.rand(B, H_sel, K) < 0.3] = -1
    return units.to(torch.int32).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("B", "H_sel", "K", "U"), [(1, 1, 1, 3), (2, 3, 7, 20), (3, 2, 40, 41), (1, 4, 1100, 1500)])
def test_mark_loaded_matches_reference(device, B, H_sel, K, U) -> None:
    needs_kernel_device(device)
    seed = fresh_seed()
    A = torch.randint(-1, 50, (B, H_sel, U + 1), dtype=torch.int32, device=device)
    units = unit_lists(B, H_sel, K, U, device)
    step = torch.randint(50, 60, (B,), device=device)
    A_ref, A_buf = A.clone(), A.clone()
    with poisoned_empty():
        seen = mark_loaded(A, units, step)
    seen_ref = mark_loaded_ref(A_ref, units, step)
    assert torch.equal(seen, seen_ref), f"seed {seed}"
    buf = torch.full((2, B, H_sel, K), 7777, dtype=torch.int32, device=device)  # a scratch row, like the step's
    assert mark_loaded(A_buf, units, step, seen=buf[1]).data_ptr() == buf[1].data_ptr()
    assert torch.equal(buf[1], seen_ref) and torch.all(buf[0] == 7777) and torch.equal(A_buf, A_ref), f"seed {seed}"
    assert torch.equal(A, A_ref), f"seed {seed}"
    valid = units >= 0
    assert torch.all(seen[~valid] == -1) and torch.all(torch.gather(A, 2, units.long().clamp(min=0))[valid]
                                                       == step.view(-1, 1, 1).expand_as(units)[valid].int())  # fmt: skip


def merge_state(B: int, H: int, S: int, slots: int, D: int, dtype: torch.dtype, device: str):
    out = torch.randn(B, H, S, D, device=device).to(dtype)
    lse = torch.randn(B, H, S, device=device) * 3
    lse[torch.rand(B, H, S, device=device) < 0.2] = float("-inf")  # rows that saw no new key
    out[lse == float("-inf")] = 0
    cache_out = torch.randn(B, slots, H, D, device=device)
    cache_lse = torch.randn(B, slots, H, device=device) * 3
    cache_lse[:, 0] = float("-inf")  # an empty slot (the window not filled yet)
    cache_out[:, 0] = 0
    cur_out = torch.full((B, H, D), float("nan"), device=device)
    cur_lse = torch.full((B, H), float("nan"), device=device)
    return out, lse, cache_out, cache_lse, cur_out, cur_lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("B", "H", "S", "slots", "D"), [(1, 2, 2, 1, 8), (2, 3, 4, 7, 24), (2, 4, 1, 3, 16), (1, 2, 8, 7, 64)])
def test_retro_merge_matches_reference(device, dtype, B, H, S, slots, D) -> None:
    needs_kernel_device(device)
    seed = fresh_seed()
    state = merge_state(B, H, S, slots, D, dtype, device)
    step = torch.randint(0, 3 * slots, (B,), device=device)  # steps below S-1 too: rows before step 0
    ref = [t.clone() for t in state]
    retro_merge(*state, step)
    retro_merge_ref(*ref, step)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, ours, want in zip(("out", "lse", "cache_out", "cache_lse", "cur_out", "cur_lse"), state, ref):
        assert_close(name, ours, want, atol=atol, rtol=atol, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("B", "H", "S", "slots", "D", "H_sel", "K", "U"),
                         [(1, 2, 2, 1, 8, 1, 5, 9), (2, 4, 3, 7, 24, 2, 40, 41), (2, 3, 1, 2, 16, 3, 7, 20),
                          (3, 32, 8, 7, 128, 8, 128, 300)])  # fmt: skip
def test_retro_upkeep_matches_references(device, dtype, B, H, S, slots, D, H_sel, K, U) -> None:
    needs_kernel_device(device)
    seed = fresh_seed()
    state = merge_state(B, H, S, slots, D, dtype, device)
    A = torch.randint(-1, 50, (B, H_sel, U + 1), dtype=torch.int32, device=device)
    units = unit_lists(B, H_sel, K, U, device)
    step = torch.randint(0, 60, (B,), device=device)
    ref = [t.clone() for t in state]
    A_ref = A.clone()
    seen = torch.full((B, H_sel, K), 7777, dtype=torch.int32, device=device)
    with poisoned_empty():
        assert retro_upkeep(A, units, step, *state, seen=seen) is seen
    seen_ref = retro_upkeep_ref(A_ref, units, step, *ref)
    assert torch.equal(seen, seen_ref) and torch.equal(A, A_ref), f"seed {seed}"
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, ours, want in zip(("out", "lse", "cache_out", "cache_lse", "cur_out", "cur_lse"), state, ref):
        assert_close(name, ours, want, atol=atol, rtol=atol, seed=seed)


def test_ring_slots_hold_the_token_of_step_t_in_slot_t_mod_slots() -> None:
    step = torch.tensor([9, 3, 1])
    assert ring_slots(step, 3, 7).tolist() == [[6, 0, 1], [0, 1, 2], [5, 6, 0]]  # steps 6-8, 0-2, -2..0
    assert ring_slots(step, 1, 1).tolist() == [[0], [0], [0]]


def test_retro_merge_reference_semantics() -> None:
    """Merging with an empty slot keeps the supplement; with an empty supplement keeps the slot."""
    out, lse, cache_out, cache_lse, cur_out, cur_lse = merge_state(1, 1, 3, 2, 4, torch.float32, "cpu")
    lse[0, 0, :2] = torch.tensor([0.5, float("-inf")])
    out[0, 0, 1] = 0
    cache_lse[0, :, 0] = torch.tensor([float("-inf"), 1.5])
    cache_out[0, 0] = 0
    supplement, kept = out[0, 0, 0].clone(), cache_out[0, 1, 0].clone()
    current = out[0, 0, 2].clone()
    retro_merge_ref(out, lse, cache_out, cache_lse, cur_out, cur_lse, torch.tensor([2]))  # steps 0, 1: slots 0, 1
    assert torch.allclose(cache_out[0, 0, 0], supplement) and float(cache_lse[0, 0, 0]) == 0.5
    assert torch.allclose(cache_out[0, 1, 0], kept) and float(cache_lse[0, 1, 0]) == 1.5
    assert torch.equal(out[0, 0, :2], cache_out[0, :, 0]) and torch.equal(cur_out[0, 0], current)
