"""Selection primitives against brute force: Quest's page bound, the oracle's top-k, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import forward_for, selection_mask

from retrobench.engine.cache import PagedKVCache
from retrobench.kernels.ops import TORCH_OPS
from retrobench.kernels.quest import quest_page_scores_ref
from retrobench.kernels.topk import topk_forced_ref
from retrobench.methods.base import Budget, ConfigError, ModelSpec
from retrobench.methods.oracle import OracleMethod
from retrobench.methods.quest import QuestMethod


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Per-query-head bounds ``[H, n]`` of one sequence (the kernels' reference, one page per row)."""
    n = kmin.shape[0]
    table = torch.arange(n, dtype=torch.int32).view(1, n)
    return quest_page_scores_ref(q.unsqueeze(0), kmin, kmax, table, torch.tensor([n]), "q_head")[0]


@settings(max_examples=80, deadline=None)
@given(
    n_pages=st.integers(1, 6),
    page_size=st.sampled_from([1, 2, 4, 16]),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 3, 4]),
    dim=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_quest_score_is_brute_force_and_an_upper_bound(n_pages, page_size, kv_heads, group, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_pages, page_size, kv_heads, dim, generator=gen) * 3  # both signs
    q = torch.randn(kv_heads * group, dim, generator=gen) * 2
    kmin, kmax = keys.amin(dim=1), keys.amax(dim=1)
    scores = quest_page_scores(q, kmin, kmax)
    for h in range(kv_heads * group):
        kv = h // group
        for j in range(n_pages):
            brute = sum(max(float(q[h, i] * kmax[j, kv, i]), float(q[h, i] * kmin[j, kv, i])) for i in range(dim))
            assert math.isclose(float(scores[h, j]), brute, rel_tol=1e-5, abs_tol=1e-5)
            dots = keys[j, :, kv] @ q[h]
            assert float(dots.max()) <= float(scores[h, j]) + 1e-4


def _cache_with_keys(keys: torch.Tensor, page_size: int) -> tuple[PagedKVCache, ModelSpec]:
    T, H_kv, D = keys.shape
    spec = ModelSpec(1, H_kv, H_kv, D, page_size)
    cache = PagedKVCache(1, H_kv, D, page_size, max_tokens=T)
    pos = torch.arange(T).unsqueeze(0)
    kv = keys.transpose(0, 1).unsqueeze(0)
    TORCH_OPS.write_kv(cache.k[0], cache.v[0], cache.page_table, pos, kv, kv)
    TORCH_OPS.update_page_minmax(cache.k[0], cache.kmin[0], cache.kmax[0], cache.page_table, pos, torch.tensor([T]))
    return cache, spec


def _select(method, cache, q: torch.Tensor, T: int):
    """The method's selection for the current query ``q [H, D]`` at context T, as a ``[H_sel, T]`` mask."""
    spec = ModelSpec(1, q.shape[0], cache.num_kv_heads, cache.head_dim, cache.page_size)
    state = method.new_state(spec, 1, T, torch.device("cpu"))
    fwd = forward_for(method, spec, cache, state, [T - 1])
    sel = method.select(0, q.unsqueeze(0), fwd, state)
    return selection_mask(sel.units, sel.unit, T)[0], sel


def _brute_mass(q, keys, scaling):
    H, G = q.shape[0], q.shape[0] // keys.shape[1]
    probs = torch.stack([torch.softmax(keys[:, h // G] @ q[h] * scaling, dim=0) for h in range(H)])
    return probs  # [H, T]


@pytest.mark.parametrize("selection", ["kv_head", "q_head", "layer"])
@pytest.mark.parametrize("granularity", ["token", "page"])
def test_oracle_selects_brute_force_top_k(selection, granularity):
    gen = torch.Generator().manual_seed(7)
    T, H_kv, G, D, P = 70, 2, 3, 8, 4
    keys = torch.randn(T, H_kv, D, generator=gen)
    q = torch.randn(H_kv * G, D, generator=gen)
    cache, _ = _cache_with_keys(keys, P)
    method = OracleMethod(budget={"tokens": 12}, selection=selection, granularity=granularity)
    select, _ = _select(method, cache, q, T)
    probs = _brute_mass(q, keys, D**-0.5)
    groups = {"kv_head": [list(range(g * G, (g + 1) * G)) for g in range(H_kv)], "q_head": [[h] for h in range(H_kv * G)],
              "layer": [list(range(H_kv * G))]}[selection]  # fmt: skip
    for row, heads in enumerate(groups):
        mass = probs[heads].sum(dim=0)
        if granularity == "token":
            order = [T - 1] + [i for i in torch.argsort(mass, descending=True, stable=True).tolist() if i != T - 1]
            expected = set(order[:12])
        else:
            page_mass = torch.stack([mass[p * P : (p + 1) * P].sum() for p in range(math.ceil(T / P))])
            last = math.ceil(T / P) - 1
            ranked = [last] + [p for p in torch.argsort(page_mass, descending=True, stable=True).tolist() if p != last]
            expected = {t for p in ranked[:3] for t in range(p * P, min(T, (p + 1) * P))}
        assert set(torch.nonzero(select[row]).flatten().tolist()) == expected


def test_quest_selects_top_pages_plus_current():
    gen = torch.Generator().manual_seed(3)
    T, H_kv, G, D, P = 61, 2, 2, 6, 8
    keys = torch.randn(T, H_kv, D, generator=gen)
    q = torch.randn(H_kv * G, D, generator=gen)
    cache, _ = _cache_with_keys(keys, P)
    method = QuestMethod(budget={"tokens": 24})  # 3 pages incl. the current one
    select, sel = _select(method, cache, q, T)
    pages = (sel.units[0] >= 0).sum(dim=-1)
    kmin, kmax = cache.page_meta(0, 0, T)
    scores = quest_page_scores(q, kmin, kmax).view(H_kv, G, -1).sum(dim=1)
    for h in range(H_kv):
        s = scores[h].clone()
        s[-1] = float("inf")
        expected = set(torch.argsort(s, descending=True, stable=True)[:3].tolist())
        chosen = {t // P for t in torch.nonzero(select[h]).flatten().tolist()}
        assert chosen == expected and float(pages[h]) == 3


def test_topk_forced_covers_everything_when_budget_is_large():
    scores = torch.randn(1, 2, 5)
    every = topk_forced_ref(scores, torch.tensor([5]), 5, torch.tensor([1]))
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in every[0].tolist())
    two = topk_forced_ref(scores, torch.tensor([2]), 2, torch.tensor([4]))
    assert (two[0, :, 0] == 4).all() and (two >= 0).sum().item() == 4


def test_budget_rules():
    assert Budget(tokens=33).num_pages(1000, 16) == 3
    assert Budget(fraction=0.15).budget_tokens(1000) == 150
    assert Budget(fraction=0.15).num_pages(100, 16, min_pages=3) == 3
    for bad in ({"tokens": 0}, {"tokens": -5}, {"fraction": 0.0}, {"fraction": 1.5}, {}, {"tokens": 4, "fraction": 0.1}):
        with pytest.raises(ConfigError, match="method.budget"):
            QuestMethod(budget=bad)
    with pytest.raises(ConfigError, match="method.selection"):
        QuestMethod(selection="per_head")
    with pytest.raises(ConfigError, match="method.granularity"):
        OracleMethod(granularity="block")
    with pytest.raises(ConfigError, match="method.dense_layers"):
        QuestMethod(dense_layers=-1)


def test_quest_scores_empty_pages_minus_inf() -> None:
    """A page with no live key (kmin = +inf, kmax = -inf) can never outrank a real page."""
    kmin, kmax = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kmax = torch.maximum(kmin, kmax)
    kmin[1], kmax[1] = float("inf"), float("-inf")
    scores = quest_page_scores(torch.randn(4, 8), kmin, kmax)
    assert scores.shape == (4, 3)
    assert torch.isneginf(scores[:, 1]).all() and torch.isfinite(scores[:, [0, 2]]).all()
