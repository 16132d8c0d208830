"""The op table: the one seam between methods and hardware, chosen by ``engine.backend``.

A method is written once, as tensor ops plus the ops below; ``engine.backend`` picks which
implementation of each op runs:

* ``torch``: the plain-PyTorch references (``<op>_ref``), on any device. They define the results
  and may synchronise with the host, so decode steps built on them are never graph-captured. One
  exception: ``dense_attention`` is PyTorch's fused SDPA, proven equal to its reference.
* both: ``prefill_attention`` (a prompt chunk's dense causal attention, never graph-captured) is
  PyTorch's SDPA (flash / memory-efficient kernels on a GPU, lower-right causal), proven equal to
  ``dense_attention_ref``.
* ``triton``: the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), or, for ops that need
  no kernel, a static-shape PyTorch version; none synchronises with the host, so a whole decode
  step can be captured in a CUDA graph. A Triton op never falls back to its reference: where it
  cannot run it raises :class:`~retrobench.kernels._triton.TritonUnavailable`.

Every op's signature and semantics are in ``kernels/README.md``; tests compare each pair on fresh
random inputs. This module imports nothing from the methods or the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from retrobench.kernels import dense, kv_write, page_meta, paged_attention, quest, retro, scores, topk
from retrobench.kernels._triton import TritonUnavailable, require_triton

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Ops:
    """One implementation of every op a method may call.

    ``capturable``: decode steps built from these ops contain no host synchronisation (CUDA graphs).
    ``kernels``: the ops that run as Triton kernels (or, for the references, may synchronise): the
    engine's capture check treats them as opaque.
    ``impl()``: per op, the function that runs (tests assert which implementation was taken).
    """

    name: str
    capturable: bool
    kernels: frozenset
    sparse_attention: Callable
    page_scores: Callable
    topk_forced: Callable
    update_page_minmax: Callable
    write_kv: Callable
    paged_logits: Callable
    dense_attention: Callable
    prefill_attention: Callable
    mark_loaded: Callable
    retro_upkeep: Callable

    def impl(self) -> dict[str, Callable]:
        return {k: v for k, v in vars(self).items() if callable(v)}


TORCH_OPS = Ops(
    name="torch",
    capturable=False,
    kernels=frozenset({"sparse_attention", "page_scores", "topk_forced", "update_page_minmax", "write_kv",
                       "paged_logits", "dense_attention", "prefill_attention", "mark_loaded", "retro_upkeep"}),  # fmt: skip
    sparse_attention=paged_attention.sparse_paged_attention_ref,
    page_scores=quest.quest_page_scores_ref,
    topk_forced=topk.topk_forced_ref,
    update_page_minmax=page_meta.update_page_minmax_ref,
    write_kv=kv_write.write_kv_ref,
    paged_logits=scores.paged_logits_ref,
    dense_attention=dense.dense_attention_sdpa,
    prefill_attention=dense.prefill_attention_sdpa,
    mark_loaded=retro.mark_loaded_ref,
    retro_upkeep=retro.retro_upkeep_ref,
)

TRITON_OPS = Ops(
    name="triton",
    capturable=True,
    kernels=frozenset({"sparse_attention", "page_scores", "update_page_minmax", "write_kv", "paged_logits",
                       "dense_attention", "prefill_attention", "mark_loaded", "retro_upkeep"}),  # fmt: skip
    sparse_attention=paged_attention.sparse_paged_attention,
    page_scores=quest.quest_page_scores,
    topk_forced=topk.topk_forced,
    update_page_minmax=page_meta.update_page_minmax,
    write_kv=kv_write.write_kv,
    paged_logits=scores.paged_logits,
    dense_attention=dense.dense_attention,
    prefill_attention=dense.prefill_attention_sdpa,
    mark_loaded=retro.mark_loaded,
    retro_upkeep=retro.retro_upkeep,
)

#: ``engine.prefill_chunk=auto``: prompt tokens per prefill forward by device type. On a GPU a chunk
#: reads every weight once, so small chunks cost weight traffic (8B bf16: 16 GB per chunk), and a
#: prompt that fits one chunk runs square causal attention, the fastest SDPA kernel (cuDNN on an
#: H200; later chunks' lower-right causal attention falls to FA2); 32768 tokens keep an 8B model's
#: chunk activations to a few GB (estimated from the shapes: the gate/up output alone is 1.9 GB). On CPU 512 keeps activations small (and the hash of runs made
#: before ``auto`` existed).
PREFILL_CHUNK = {"cpu": 512, "cuda": 32768}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` -> ``triton`` on a CUDA device (``cuda``, ``cuda:N``; ``auto`` when a GPU is visible)
    with the triton package installed, else ``torch``; any other value is returned as is."""
    if backend != "auto":
        return backend
    import importlib.util

    device = str(device)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "triton" if cuda and importlib.util.find_spec("triton") is not None else "torch"


def resolve_prefill_chunk(chunk: int | str, device: torch.device | str) -> int | str:
    """``auto`` -> :data:`PREFILL_CHUNK` of the device type (``auto`` devices: CUDA when a GPU is
    visible); any other value is returned as is."""
    if chunk != "auto":
        return chunk
    device = str(device)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return PREFILL_CHUNK["cuda" if cuda else "cpu"]


def get_ops(backend: str, device: torch.device | str = "cpu") -> Ops:
    """The op table of ``backend`` (``torch`` | ``triton``) for tensors on ``device``.

    Raises ValueError for an unknown backend and TritonUnavailable when ``triton`` cannot run on
    ``device`` (no triton, or a CPU device without ``TRITON_INTERPRET=1``).
    """
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        require_triton(torch.empty(0, device=device), f"engine.backend=triton on {torch.device(device)}")
        return TRITON_OPS
    raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "PREFILL_CHUNK", "Ops", "TORCH_OPS", "TRITON_OPS", "TritonUnavailable", "get_ops",
           "resolve_backend", "resolve_prefill_chunk"]
