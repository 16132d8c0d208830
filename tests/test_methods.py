"""The method matrix: every method discovered from ``conf/method/*.yaml`` gets the same checks.

- it runs prefill + 64 decode steps on tiny_random (the bound checked at every step) and prefill +
  16 decode steps on smollm2 (GQA 9 query / 3 KV heads, 30 layers);
- with a budget covering the whole context it produces full attention's tokens and logits;
- the current query never attends more KV than the method's stated bound, at any step;
- state hygiene: sample A then B equals B on a fresh engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retrobench.engine import Engine
from retrobench.methods.full import FullMethod

CONF = Path(__file__).resolve().parent.parent / "conf" / "method"
METHODS = sorted(p.stem for p in CONF.glob("*.yaml"))


def make_method(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return instantiate(cfg, _convert_="all")


def unlimited(name: str):
    """The method with a budget covering any context used here."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if "budget" in cfg:
        return make_method(name, **{"budget": {"tokens": 10**6, "fraction": None}})
    return make_method(name)


def tight(name: str):
    """The method at a small budget (so selection and eviction really happen)."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if "budget" in cfg:
        return make_method(name, **{"budget": {"tokens": 48, "fraction": None}})
    return make_method(name)


def prompt(model, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(model.config.vocab_size, 20000) - 4, (n,), generator=gen).tolist()


@pytest.mark.parametrize("name", METHODS)
def test_runs_and_respects_budget_tiny(tiny_random, name):
    model, _ = tiny_random
    method = tight(name)
    engine = Engine(model, method)
    request = engine.new_request(300, record_steps=True)
    ids = torch.tensor([prompt(model, 200, 0)])
    logits = engine.prefill(request, ids)
    token = int(logits.argmax())
    generated = [token]
    for step in range(64):
        lo = max(0, len(generated) - method.reprocess_window)
        feed = torch.tensor([generated[lo:]])
        pos = torch.arange(200 + lo, 200 + len(generated)).unsqueeze(0)
        logits = engine.forward(request, feed, pos, "decode", step)
        generated.append(int(logits.argmax()))
        stats = engine.step_stats(request)[-1]
        bound = method.attended_bound(int(stats["context"]), engine.page_size)
        assert stats["attended_kv_max"] <= bound, f"step {step}: {stats['attended_kv_max']} > {bound}"
        assert torch.isfinite(logits).all()
    assert len(engine.step_stats(request)) == 64


@pytest.mark.parametrize("name", METHODS)
def test_runs_on_smollm2_gqa(smollm2, name):
    model, _ = smollm2
    gen = Engine(model, tight(name)).generate(prompt(model, 160, 1), 17)
    assert len(gen.tokens) == 17 and gen.stats["attended_kv"] > 0
    assert gen.stats.get("resident_kv", 0) > 0


@pytest.mark.parametrize("name", METHODS)
def test_unlimited_budget_equals_full(tiny_random, name):
    model, _ = tiny_random
    ids = prompt(model, 150, 2)
    full = Engine(model, FullMethod()).generate(ids, 48, keep_logits=True)
    ours = Engine(model, unlimited(name)).generate(ids, 48, keep_logits=True)
    assert ours.tokens == full.tokens
    torch.testing.assert_close(ours.logits, full.logits, rtol=1e-5, atol=1e-5 * float(full.logits.abs().max()))


@pytest.mark.parametrize("name", METHODS)
def test_state_hygiene(tiny_random, name):
    model, _ = tiny_random
    a, b = prompt(model, 120, 3), prompt(model, 90, 4)
    engine = Engine(model, tight(name))
    engine.generate(a, 24)
    after = engine.generate(b, 24, keep_logits=True)
    fresh = Engine(model, tight(name)).generate(b, 24, keep_logits=True)
    assert after.tokens == fresh.tokens and torch.equal(after.logits, fresh.logits)
    assert after.stats["attended_kv"] == fresh.stats["attended_kv"]


@pytest.mark.parametrize("name", METHODS)
def test_settings_flatten(name):
    settings = tight(name).settings()
    assert settings["method"] == name
    assert all(not dataclasses.is_dataclass(v) for v in settings.values())
