"""Test doubles for calling a method's pieces directly: a synthetic cache and a hand-built Forward.

``synthetic_cache`` writes random keys and values at positions [0, T) of every sequence through
the op table (so page min/max are exact); ``forward_for`` builds the :class:`Forward` the engine
would hand a method for one forward at given positions (plan included), so a test can call
``select``, ``prefill`` or ``decode`` of one layer and compare with a brute-force computation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

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


# ---- every method, in the settings the equivalence tests run ---------------------------------------
CONF = Path(__file__).resolve().parent.parent / "conf" / "method"
T = {"budget": {"tokens": 24, "fraction": None}}
F = {"budget": {"tokens": None, "fraction": 0.3}}
IB = {"budget": {"tokens": 48, "fraction": None}}  # InfLLM: n_init 0, window 31, one 16-token block
METHOD_CASES = {
    "full": ("full", {}),
    "quest-kv_head": ("quest", T),
    "quest-q_head": ("quest", {**T, "selection": "q_head"}),
    "quest-layer": ("quest", {**F, "selection": "layer"}),
    "oracle-token": ("oracle", T),
    "oracle-page-q_head": ("oracle", {**T, "granularity": "page", "selection": "q_head"}),
    "infllm-layer": ("infllm", {**IB, "block_size": 16}),
    "infllm-kv_head": ("infllm", {**F, "block_size": 16, "selection": "kv_head"}),
    "streaming": ("streaming", T),
    "tova": ("tova", F),
    "retro-quest-w2": ("retro", {**T, "window": 2}),
    "retro-quest-w3-cached": ("retro", {**F, "window": 3, "past_query": "cached"}),
    "retro-quest-w3-q_head": ("retro", {**T, "window": 3, "selection": "q_head"}),
    "retro-oracle-w2": ("retro", {**T, "window": 2, "base": "oracle"}),
    "retro-oracle-page-w3-cached": ("retro", {**T, "window": 3, "base": "oracle", "past_query": "cached",
                                              "base_options": {"granularity": "page"}}),
    "retro-infllm-w2": ("retro", {**IB, "window": 2, "base": "infllm", "base_options": {"block_size": 16}}),
    "retro-infllm-w3-cached": ("retro", {**F, "window": 3, "base": "infllm", "past_query": "cached",
                                         "base_options": {"block_size": 16}}),
}  # fmt: skip
for _name in sorted(p.stem for p in CONF.glob("*.yaml")):  # a new method is covered at its defaults
    if not any(method == _name for method, _ in METHOD_CASES.values()):
        METHOD_CASES[_name] = (_name, T if "budget" in OmegaConf.load(CONF / f"{_name}.yaml") else {})

def make_case(name: str, **extra):
    method, overrides = METHOD_CASES[name]
    cfg = OmegaConf.load(CONF / f"{method}.yaml")
    cfg.dense_layers = 1 if method in ("quest", "oracle", "infllm", "retro") else cfg.dense_layers
    for key, value in {**overrides, **extra}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return instantiate(cfg, _convert_="all")


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 20000) - 4, (n,), generator=g).tolist()
