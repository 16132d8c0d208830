"""Test doubles for calling a method's pieces directly: a synthetic cache and a hand-built Forward.

``synthetic_cache`` writes random keys and values at positions [0, T) of every sequence through
the op table (so page min/max are exact); ``forward_for`` builds the :class:`Forward` the engine
would hand a method for one forward at given positions (plan included), so a test can call
``select``, ``prefill`` or ``decode`` of one layer and compare with a brute-force computation.
"""

from __future__ import annotations

import torch

from retrobench.engine.cache import PagedKVCache
from retrobench.kernels.ops import TORCH_OPS, Ops
from retrobench.methods.base import INT32_MAX, Accounting, Forward, Method, ModelSpec


def synthetic_cache(
    spec: ModelSpec, T: int, batch: int = 1, seed: int = 0, capacity: int | None = None, ops: Ops = TORCH_OPS
) -> PagedKVCache:
    """A cache of ``spec``'s shape holding random K/V at positions [0, T) of every sequence."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size, capacity or T, batch)
    pos = torch.arange(T).expand(batch, T)
    lengths = torch.full((batch,), T)
    for layer in range(spec.num_layers):
        k = torch.randn(batch, spec.num_kv_heads, T, spec.head_dim, generator=gen)
        v = torch.randn(batch, spec.num_kv_heads, T, spec.head_dim, generator=gen)
        ops.write_kv(cache.k[layer], cache.v[layer], cache.page_table, pos, k, v)
        ops.update_page_minmax(cache.k[layer], cache.kmin[layer], cache.kmax[layer], cache.page_table, pos, lengths)
    return cache


def forward_for(
    method: Method,
    spec: ModelSpec,
    cache: PagedKVCache,
    state: object,
    positions: torch.Tensor | list,
    phase: str = "decode",
    step: int = 0,
    last_chunk: bool = False,
    ops: Ops = TORCH_OPS,
    acct: Accounting | None = None,
) -> Forward:
    """The Forward of one forward at ``positions [B, S]`` (its plan computed by ``method.plan``)."""
    pos = torch.as_tensor(positions, dtype=torch.int64)
    pos = pos.view(1, -1) if pos.dim() == 1 else pos
    B, S = pos.shape
    ends = pos[:, -1] + 1
    steps = [step] * B
    plan = method.plan(state, ends.tolist(), steps, phase, last_chunk)
    rows = torch.arange(S - 1)
    q_step = torch.cat([torch.tensor(steps).view(B, 1) - (S - 1) + rows, torch.full((B, 1), INT32_MAX)], dim=1)
    return Forward(
        phase=phase, ops=ops, cache=cache, state=state, spec=spec, scaling=spec.head_dim**-0.5, pos=pos, ends=ends,
        n_pages=(ends + spec.page_size - 1) // spec.page_size, step=torch.tensor(steps), q_step=q_step,
        plan={k: torch.tensor(v) for k, v in plan.items()}, acct=acct or Accounting(spec.num_layers, B, "cpu"),
        last_chunk=last_chunk,
    )  # fmt: skip


def selection_mask(units: torch.Tensor, unit: int, end: int) -> torch.Tensor:
    """``[B, H_sel, end]`` bool: the keys a selection's unit lists cover (positions < end)."""
    B, H_sel, _ = units.shape
    mask = torch.zeros(B, H_sel, end + unit, dtype=torch.bool)
    for b in range(B):
        for h in range(H_sel):
            for u in units[b, h].tolist():
                if u >= 0:
                    mask[b, h, u * unit : (u + 1) * unit] = True
    return mask[..., :end]
