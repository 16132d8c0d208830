"""Aggregation statistics: bootstrap coverage, paired differences, degenerate inputs, fidelity math.

The bootstrap CI is checked against its promise (a 95% interval covers the true mean of a known
distribution about 95% of the time), paired differences against synthetic pairs with a known
shift, and aggregation against rows of every task mode (generate, ppl, fidelity).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrobench.store.metrics import (
    aggregate,
    agreement,
    bootstrap_ci,
    kl_per_position,
    paired_difference,
    paired_metric,
    summarize,
    token_nll,
)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_stated_rate() -> None:
    rng = np.random.default_rng(1234)
    mu, trials, covered = 3.0, 200, 0
    for trial in range(trials):
        values = rng.normal(mu, 2.0, size=40)
        low, high = bootstrap_ci(values, n_boot=2000, alpha=0.05, seed=trial)
        assert low <= values.mean() <= high
        covered += low <= mu <= high
    assert 0.90 <= covered / trials <= 0.99


def test_bootstrap_ci_is_deterministic_and_narrows_with_alpha() -> None:
    values = list(np.random.default_rng(0).exponential(size=30))
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    low95, high95 = bootstrap_ci(values, alpha=0.05)
    low50, high50 = bootstrap_ci(values, alpha=0.5)
    assert low95 < low50 < high50 < high95
    long = np.arange(200_000, dtype=float)  # blocked resampling keeps memory bounded
    low, high = bootstrap_ci(long, n_boot=50)
    assert low < long.mean() < high


def test_summarize_and_bootstrap_of_empty_and_nan_inputs() -> None:
    for empty in ([], [None], [float("nan"), float("inf")]):
        s = summarize(empty)
        assert s["n"] == 0 and all(math.isnan(s[k]) for k in ("mean", "std", "p10", "p50", "p90"))
        assert all(math.isnan(v) for v in bootstrap_ci(empty))
    s = summarize([2.0, float("nan"), None])
    assert s["n"] == 1 and s["mean"] == 2.0 and s["std"] == 0.0
    assert bootstrap_ci([2.0, float("nan")]) == (2.0, 2.0)


def test_paired_difference_on_synthetic_pairs() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(0.0, 5.0, size=60)  # large between-sample spread, small paired noise
    a = {f"s{i}": float(x + 0.5 + rng.normal(0, 0.2)) for i, x in enumerate(base)}
    b = {f"s{i}": float(x) for i, x in enumerate(base)}
    a["only_a"], b["only_b"] = 100.0, -100.0
    a["s0"], b["s1"] = None, float("nan")  # dropped: not a finite pair
    d = paired_difference(a, b, seed=0)
    assert d["n"] == 58 and abs(d["mean"] - 0.5) < 0.1 and 0.1 < d["std"] < 0.3
    assert 0.0 < d["ci_low"] < 0.5 < d["ci_high"]
    assert paired_difference(a, b, seed=0) == d
    flipped = paired_difference(b, a, seed=0)
    assert flipped["n"] == 58 and math.isclose(flipped["mean"], -d["mean"])
    unpaired = summarize([a[k] for k in a if k.startswith("s") and a[k] is not None])
    assert unpaired["std"] > 10 * d["std"]  # pairing removes the between-sample spread
    empty = paired_difference({"x": 1.0}, {"y": 1.0})
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["ci_low"])
    one = paired_difference({"x": 3.0}, {"x": 1.0})
    assert (
        one["n"] == 1 and one["mean"] == 2.0 and one["std"] == 0.0 and one["ci_low"] == one["ci_high"] == 2.0
    )


def test_paired_metric_matches_rows_by_id() -> None:
    rows_a = [{"id": f"s{i}", "score": {"kl": 0.1 * i + 1.0}} for i in range(5)]
    rows_b = [{"id": f"s{i}", "score": {"kl": 0.1 * i}} for i in reversed(range(6))]
    d = paired_metric(rows_a, rows_b, "kl")
    assert d["n"] == 5 and math.isclose(d["mean"], 1.0) and d["std"] < 1e-12


def test_agreement_kl_and_nll() -> None:
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    assert agreement(logits, logits) == (1.0, 0.0)
    p = torch.tensor([[math.log(0.9), math.log(0.1)]], dtype=torch.float64)
    q = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    top1, kl = agreement(p, q)
    assert top1 == 1.0 and abs(kl - expected) < 1e-12
    assert kl_per_position(p, q).dtype == torch.float64
    chunked = kl_per_position(logits, logits.flip(0), chunk=2)
    assert torch.allclose(chunked, kl_per_position(logits, logits.flip(0)), rtol=0, atol=1e-15)
    targets = [3, 1, 0, 10, 2, 2, 5]
    nll = token_nll(logits, targets, chunk=3)
    manual = -torch.log_softmax(logits.double(), -1)[torch.arange(7), torch.tensor(targets)]
    assert torch.allclose(nll, manual, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        kl_per_position(logits, logits[:3])


def _base(i: int, score: dict) -> dict:
    return {"id": f"s{i}", "score": score, "ttft_s": 0.1, "new_tokens": 4, "step_times_s": [0.01] * 3,
            "stats": {"attended_kv": 8.0, "resident_kv": 16.0}, "wall_s": 1.0}  # fmt: skip


def test_aggregate_handles_every_mode() -> None:
    generate = aggregate(
        [_base(0, {"accuracy": 1.0, "completion": 1.0}), _base(1, {"accuracy": 0.0, "completion": 0.5})]
    )
    assert generate["metrics"]["accuracy"] == 0.5 and generate["metrics"]["completion"] == 0.75

    ppl_rows = [_base(i, {"nll": 2.0 + i, "ppl": math.exp(2.0 + i), "nll_bucket_0": 1.0 + i, "completion": 1.0})
                for i in range(3)]  # fmt: skip
    ppl = aggregate(ppl_rows)
    m = ppl["metrics"]
    assert m["accuracy"] is None and m["completion"] == 1.0 and m["nll"] == 3.0 and m["nll_bucket_0"] == 2.0
    assert "accuracy" not in ppl["summaries"]
    s = ppl["summaries"]["nll"]
    assert s["n"] == 3 and s["ci_low"] <= 3.0 <= s["ci_high"] and s["std"] == 1.0

    fid = aggregate([_base(0, {"top1_agreement": 1.0, "kl_full_method": 0.0, "mass_recall_layer_2": 0.9}),
                     _base(1, {"top1_agreement": 0.5, "kl_full_method": 0.2})])  # fmt: skip
    fm = fid["metrics"]
    assert fm["top1_agreement"] == 0.75 and math.isclose(fm["kl_full_method"], 0.1)
    assert fm["mass_recall_layer_2"] == 0.9 and fid["summaries"]["mass_recall_layer_2"]["n"] == 1
    assert aggregate([])["metrics"]["n"] == 0 and aggregate([])["metrics"]["accuracy"] is None
