"""Guarded Triton import and the small helpers every kernel launcher shares.

Triton is optional: on a machine without it (macOS) ``HAS_TRITON`` is False and the kernel modules
still import, so ``engine.backend=torch`` (the references) works everywhere. A Triton op never
falls back to its reference: called where it cannot run it raises :class:`TritonUnavailable`, so a
run or test that asked for the kernels either gets them or stops. Kernels run on a CUDA GPU, or
on CPU under ``TRITON_INTERPRET=1`` (set before Python starts; the interpreter decides at
``@triton.jit`` time). The interpreter computes bf16 arithmetic silently wrong, so
kernels upcast to fp32 right after every load and CPU tests use fp32/fp16 only.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

LOG2E = 1.4426950408889634  # log2(e): softmax runs on exp2 inside kernels

if HAS_TRITON:
    # triton.language's own combine functions, for ``tl.reduce(x, axis, SUM)`` / ``tl.associative_scan``
    # in place of ``tl.sum`` / ``tl.min`` / ``tl.max`` / ``tl.cumsum``. On fp32 and int32 inputs (all our
    # kernels reduce) the compiled code is the same: those library functions only widen narrower types,
    # then call the same reduce. The interpreter maps these combine functions to numpy as well, but it
    # runs every nested ``@triton.jit`` call (the library functions are ones) by re-patching
    # triton.language, about 5 ms a call: under ``TRITON_INTERPRET=1`` that was most of a CPU engine
    # test's time. For the same reason kernels here call no ``@triton.jit`` helpers of their own.
    SUM = tl.standard._sum_combine
    MIN = tl.standard._elementwise_min
    MAX = tl.standard._elementwise_max
else:  # pragma: no cover
    SUM = MIN = MAX = None


class TritonUnavailable(RuntimeError):
    """A Triton kernel was asked for where none can run (no triton, or a CPU tensor without the interpreter)."""


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton path can run on ``t``'s device (CUDA, or any device under the interpreter)."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def require_triton(t: torch.Tensor, op: str) -> None:
    """Raise :class:`TritonUnavailable` unless ``op``'s kernel can run on ``t``'s device."""
    if not HAS_TRITON:
        raise TritonUnavailable(f"{op}: triton is not installed")
    if not (t.is_cuda or INTERPRET):
        raise TritonUnavailable(
            f"{op}: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before Python starts "
            f"(got a {t.device.type} tensor)"
        )


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (never TF32), native otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(t: torch.Tensor) -> int:
    """How many programs fill the device: two waves of SMs on CUDA, a handful under the interpreter."""
    if t.is_cuda:
        return 2 * sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4
