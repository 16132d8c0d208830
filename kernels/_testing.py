"""Test helpers for the kernels: poisoned allocations, a reporting ``assert_close``, the kernel-device skip.

``poisoned_empty()`` patches ``torch.empty`` / ``torch.empty_like`` so every buffer a launcher
allocates starts as NaN (floats) or a sentinel (ints): an output element the kernel forgets to
write then fails the comparison (flash-linear-attention's conftest does the same).
"""

from __future__ import annotations

import contextlib
import os
import random

import torch

INT_POISON = -123456789


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(INT_POISON)


@contextlib.contextmanager
def poisoned_empty():
    """Within the block, ``torch.empty`` and ``torch.empty_like`` return poisoned tensors."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        return _poison(empty(*args, **kwargs))

    def poisoned_like(*args, **kwargs):
        return _poison(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned, poisoned_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def fresh_seed() -> int:
    """A new random seed per test (``KERNEL_TEST_SEED`` pins one), seeded into torch; print it on failure."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    return seed


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, seed=None):
    """``torch.testing.assert_close`` with NaN/inf positions required to agree, and a short report."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)} (seed {seed})")
    a, e = actual.float(), expected.float()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        bad = torch.isnan(a).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(torch.isnan(a).sum())} NaN (unwritten?) at {bad} (seed {seed})")
    finite = torch.isfinite(e)
    same_inf = torch.equal(torch.where(finite, 0.0, e), torch.where(finite, 0.0, torch.where(torch.isfinite(a), 0.0, a)))
    if not same_inf:
        raise AssertionError(f"{name}: infinite entries differ (seed {seed})")
    diff = (a - e).abs().where(finite, torch.zeros_like(a))
    tol = atol + rtol * e.abs().where(finite, torch.zeros_like(e))
    if (diff > tol).any() or torch.isnan(diff).any():
        idx = (diff > tol).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int((diff > tol).sum())}/{diff.numel()} outside atol={atol} rtol={rtol}; "
            f"max abs err {float(diff.max()):.3g}, first at {idx} (seed {seed})"
        )


def needs_kernel_device(device: str) -> None:
    """Skip (pytest) unless the Triton kernels can run on ``device``: a GPU, or CPU under the interpreter."""
    import pytest

    from retrobench.kernels._triton import triton_usable

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not triton_usable(torch.empty(0, device=device)):
        pytest.skip("Triton cannot run here (set TRITON_INTERPRET=1 before Python starts, or use a GPU)")
