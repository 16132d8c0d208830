"""Selection primitives against brute force: Quest's page bound, the oracle's top-k, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retrobench.engine.cache import PagedKVCache
from retrobench.methods.base import Budget, ConfigError
from retrobench.methods.common import topk_with_forced
from retrobench.methods.oracle import OracleMethod
from retrobench.methods.quest import QuestMethod, quest_page_scores


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


def _cache_with_keys(keys: torch.Tensor, page_size: int) -> PagedKVCache:
    T, H_kv, D = keys.shape
    cache = PagedKVCache(1, H_kv, D, page_size, max_tokens=T)
    pos = torch.arange(T).unsqueeze(0)
    cache.reserve(pos)
    kv = keys.transpose(0, 1).unsqueeze(0)
    cache.write(0, pos, kv, kv)
    return cache


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
    cache = _cache_with_keys(keys, P)
    method = OracleMethod(budget={"tokens": 12}, selection=selection, granularity=granularity)
    select, _ = method.select(0, q, cache, 0, T, None, D**-0.5)
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
    cache = _cache_with_keys(keys, P)
    method = QuestMethod(budget={"tokens": 24})  # 3 pages incl. the current one
    select, pages = method.select(0, q, cache, 0, T, None, D**-0.5)
    kmin, kmax = cache.page_meta(0, 0)
    scores = quest_page_scores(q, kmin, kmax).view(H_kv, G, -1).sum(dim=1)
    for h in range(H_kv):
        s = scores[h].clone()
        s[-1] = float("inf")
        expected = set(torch.argsort(s, descending=True, stable=True)[:3].tolist())
        chosen = {t // P for t in torch.nonzero(select[h]).flatten().tolist()}
        assert chosen == expected and float(pages[h]) == 3


def test_topk_with_forced_covers_everything_when_budget_is_large():
    scores = torch.randn(2, 5)
    assert topk_with_forced(scores, 5, forced=1).all()
    mask = topk_with_forced(scores, 2, forced=4)
    assert mask[:, 4].all() and mask.sum().item() == 4


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
    from retrobench.methods.quest import quest_page_scores

    kmin, kmax = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kmax = torch.maximum(kmin, kmax)
    kmin[1], kmax[1] = float("inf"), float("-inf")
    scores = quest_page_scores(torch.randn(4, 8), kmin, kmax)
    assert scores.shape == (4, 3)
    assert torch.isneginf(scores[:, 1]).all() and torch.isfinite(scores[:, [0, 2]]).all()
