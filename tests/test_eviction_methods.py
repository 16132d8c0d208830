"""StreamingLLM and TOVA on ``tiny_random``: exactness at a full budget, the budget at every step
(the first decode step included), which tokens each method keeps, freed KV, bad settings, hygiene."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch

from retrobench.engine import Engine
from retrobench.methods.base import ConfigError
from retrobench.methods.full import FullMethod
from retrobench.methods.streaming import StreamingMethod
from retrobench.methods.tova import TOVAMethod

L, N = 40, 24  # prompt tokens, generated tokens


def prompt(model, length: int = L, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size - 4, (length,), generator=gen).tolist()


def live_of(req) -> torch.Tensor:
    """``[layers, T]`` liveness of sequence 0 (StreamingLLM keeps one mask for every layer)."""
    live = req.state.live
    return live[:, 0] if live.dim() == 3 else live[0].expand(req.cache.num_layers, -1)


def live_counts(req) -> torch.Tensor:
    """``[layers]`` live KV tokens of sequence 0."""
    return live_of(req).sum(dim=-1)


def step_through(engine, ids: list[int], n: int, check) -> None:
    """Prefill, then n greedy decode steps; ``check(req, end)`` after prefill (end = L) and each step."""
    req = engine.new_request(len(ids) + n, record_steps=True)
    logits = engine.prefill(req, torch.tensor([ids]))
    check(req, len(ids), None)
    for i in range(n):
        pos = len(ids) + i
        tok = torch.argmax(logits, dim=-1, keepdim=True)
        logits = engine.forward(req, tok, torch.tensor([[pos]]), "decode", i)
        check(req, pos + 1, engine.step_stats(req)[-1])


@pytest.mark.parametrize(
    "method",
    [StreamingMethod(budget={"tokens": L + N}), StreamingMethod(budget={"fraction": 1.0}, sinks=0),
     TOVAMethod(budget={"tokens": L + N}), TOVAMethod(budget={"fraction": 1.0})],
    ids=["streaming-tokens", "streaming-fraction", "tova-tokens", "tova-fraction"],
)  # fmt: skip
def test_full_budget_equals_full_attention(tiny_random, method):
    """Exact on the reference ops: full attention's dense_attention and prefill_attention ops (SDPA)
    rounds differently from the sparse reference the eviction methods decode with, so both sides
    use the reference here (tests/test_kernels_dense.py proves SDPA equal to it within fp32)."""
    import dataclasses

    from retrobench.kernels.dense import dense_attention_ref
    from retrobench.kernels.ops import TORCH_OPS

    model, _ = tiny_random
    ids = prompt(model)
    engines = [Engine(model, FullMethod()), Engine(model, method)]
    for engine in engines:
        engine.ops = dataclasses.replace(TORCH_OPS, dense_attention=dense_attention_ref, prefill_attention=dense_attention_ref)
    ref, gen = (engine.generate(ids, N, keep_logits=True) for engine in engines)
    assert gen.tokens == ref.tokens
    torch.testing.assert_close(gen.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert gen.stats["resident_kv"] == ref.stats["resident_kv"]


@pytest.mark.parametrize("budget", [{"tokens": 12}, {"fraction": 0.3}])
def test_streaming_keeps_sinks_and_recent_window(tiny_random, budget):
    model, _ = tiny_random
    method = StreamingMethod(budget=budget, sinks=4)

    def check(req, end, stats):
        B = method.budget.budget_tokens(end)
        idx = torch.arange(end)
        expected = (idx < 4) | (idx >= end - (B - 4)) if end > B else torch.ones(end, dtype=torch.bool)
        live = live_of(req)[:, :end]
        assert torch.equal(live, expected.expand_as(live)), f"context {end}"
        assert not live_of(req)[:, end:].any()
        assert bool((live_counts(req) <= B).all())
        if stats is not None:  # the current query attends exactly the kept set, never more than B
            assert stats["attended_kv"] == min(end, B) <= stats["budget_kv"] == B
            assert stats["resident_kv"] == min(end, B)

    step_through(Engine(model, method), prompt(model), N, check)


@pytest.mark.parametrize("budget", [{"tokens": 12}, {"fraction": 0.3}])
def test_tova_budget_every_step(tiny_random, budget):
    model, _ = tiny_random
    method = TOVAMethod(budget=budget)

    def check(req, end, stats):
        B = method.budget.budget_tokens(end)
        assert bool((live_counts(req) == min(end, B)).all()), f"context {end}: {live_counts(req).tolist()}"
        assert bool(live_of(req)[:, end - 1].all())  # the newest token is never evicted
        if stats is not None:  # attends the budgeted cache of the previous step plus itself
            assert stats["attended_kv"] == min(end, method.budget.budget_tokens(end - 1) + 1) <= B + 1
            assert stats["resident_kv"] == min(end, B) and stats["budget_kv"] == B

    step_through(Engine(model, method), prompt(model), N, check)


@dataclass
class SpyTOVA(TOVAMethod):
    """Records, per layer, the query, the keys and the live set before and after each compression."""

    name: ClassVar[str] = "spy_tova"
    log: list[Any] = field(default_factory=list)

    def _spy(self, phase, layer, q, fwd, run):
        end = int(fwd.ends[0])
        before = fwd.state.live[layer, 0, :end].clone()
        before[fwd.pos[0]] = True  # this forward's tokens become live as it begins
        result = run()
        keys = fwd.cache.keys(layer, 0, end).clone()
        self.log.append((phase, layer, q[0, :, -1].clone(), keys, before, fwd.state.live[layer, 0, :end].clone()))
        return result

    def prefill(self, layer, q, fwd):
        run = lambda: super(SpyTOVA, self).prefill(layer, q, fwd)  # noqa: E731
        return self._spy("prefill", layer, q, fwd, run) if fwd.last_chunk else run()

    def decode(self, layer, q, fwd):
        return self._spy("decode", layer, q, fwd, lambda: super(SpyTOVA, self).decode(layer, q, fwd))


def brute_weights(q: torch.Tensor, k: torch.Tensor, live: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-averaged softmax weights, one query head at a time."""
    H, H_kv = q.shape[0], k.shape[1]
    rows = []
    for h in range(H):
        s = (k[:, h // (H // H_kv)].double() @ q[h].double()) * scaling
        s[~live] = float("-inf")
        rows.append(torch.softmax(s, dim=0))
    return torch.stack(rows).mean(dim=0)


def test_tova_evicts_lowest_head_averaged_weight(tiny_random):
    model, _ = tiny_random
    B = 16
    method = SpyTOVA(budget={"tokens": B})
    engine = Engine(model, method)
    engine.generate(prompt(model), 8)
    scaling = engine.scaling
    prefill = [e for e in method.log if e[0] == "prefill"]
    decode = [e for e in method.log if e[0] == "decode"]
    assert len(prefill) == model.config.num_hidden_layers and len(decode) == 7 * model.config.num_hidden_layers
    for _, layer, q, k, before, after in prefill:  # prompt cut to the top B by the last token's weights
        w = brute_weights(q, k, before, scaling)
        w[L - 1] = float("inf")
        assert torch.equal(after.nonzero().squeeze(1), torch.sort(torch.topk(w, B).indices).values)
    for _, layer, q, k, before, after in decode:  # exactly one eviction: the argmin over older live keys
        assert int(before.sum()) == B + 1 and int(after.sum()) == B
        w = brute_weights(q, k, before, scaling)
        w[~before] = float("inf")
        w[-1] = float("inf")
        assert (before & ~after).nonzero().squeeze(1).tolist() == [int(torch.argmin(w))], f"layer {layer}"


@pytest.mark.parametrize("method", [StreamingMethod(budget={"tokens": 16}), TOVAMethod(budget={"tokens": 16})])
def test_resident_kv_shrinks(tiny_random, method):
    model, _ = tiny_random
    ids = prompt(model)
    full = Engine(model, FullMethod()).generate(ids, N)
    gen = Engine(model, method).generate(ids, N)
    assert gen.stats["resident_kv"] == 16 < full.stats["resident_kv"]
    assert gen.stats["kv_bytes"] < full.stats["kv_bytes"]


@pytest.mark.parametrize("cls", [StreamingMethod, TOVAMethod])
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"budget": {"tokens": 0}}, "method.budget.tokens"), ({"budget": {"fraction": 1.5}}, "method.budget.fraction"),
     ({"budget": {"tokens": 8, "fraction": 0.1}}, "method.budget"), ({"dense_layers": 2}, "method.dense_layers"),
     ({"dense_layers": -1}, "method.dense_layers")],
)  # fmt: skip
def test_invalid_settings(cls, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        cls(**kwargs)


def test_invalid_streaming_sinks(tiny_random):
    with pytest.raises(ConfigError, match="method.sinks"):
        StreamingMethod(sinks=-1)
    with pytest.raises(ConfigError, match="method.sinks"):
        StreamingMethod(budget={"tokens": 4}, sinks=4)
    # a fraction budget smaller than the sinks keeps budget - 1 sinks plus the current token
    method = StreamingMethod(budget={"fraction": 0.05}, sinks=4)
    assert method.kept(40) == (1, 39)  # budget 2 at context 40: one sink and the current token
    model, _ = tiny_random
    gen = Engine(model, method).generate(prompt(model), 2)
    assert len(gen.tokens) == 2


@pytest.mark.parametrize("make", [lambda: StreamingMethod(budget={"tokens": 12}), lambda: TOVAMethod(budget={"tokens": 12})])
def test_state_hygiene(tiny_random, make):
    model, _ = tiny_random
    a, b = prompt(model, 40, seed=1), prompt(model, 23, seed=2)
    engine = Engine(model, make())
    engine.generate(a, 24)
    b_after_a = engine.generate(b, 24, keep_logits=True)
    b_fresh = Engine(model, make()).generate(b, 24, keep_logits=True)
    assert b_after_a.tokens == b_fresh.tokens
    assert torch.equal(b_after_a.logits, b_fresh.logits)
