"""InfLLM-style selection: equals full attention at a covering budget, stays within its stated
bound every step, and its representative scores, representatives and block choice equal
brute-force computations on small synthetic caches."""

from __future__ import annotations

import pytest
import torch

from harness import forward_for, selection_mask, synthetic_cache

from retrobench.engine import Engine
from retrobench.methods.base import ConfigError, ModelSpec
from retrobench.methods.full import FullMethod
from retrobench.methods import infllm
from retrobench.methods.infllm import InfLLMMethod

H, H_KV, D, P = 4, 2, 8, 16
G = H // H_KV
SPEC = ModelSpec(1, H, H_KV, D, P)


def prompt(model, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size - 4, (n,), generator=gen).tolist()


def synthetic(T: int, seed: int = 0):
    """A one-layer cache holding T random keys/values, and random queries ``[1, H, T, D]``."""
    cache = synthetic_cache(SPEC, T, seed=seed)
    return cache, torch.randn(1, H, T, D, generator=torch.Generator().manual_seed(seed + 100))


def fresh_state(method: InfLLMMethod, T: int):
    return method.new_state(SPEC, 1, T, torch.device("cpu"))


@pytest.mark.parametrize("budget", [{"tokens": 10**6}, {"fraction": 1.0}])
@pytest.mark.parametrize("dense_layers", [0, 2])
def test_covering_budget_equals_full(tiny_random, budget, dense_layers):
    model, _ = tiny_random
    ids = prompt(model, 150, 2)
    full = Engine(model, FullMethod()).generate(ids, 40, keep_logits=True)
    method = InfLLMMethod(budget=budget, dense_layers=dense_layers)
    ours = Engine(model, method).generate(ids, 40, keep_logits=True)
    assert ours.tokens == full.tokens
    atol = 1e-5 * float(full.logits.abs().max())
    torch.testing.assert_close(ours.logits, full.logits, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    ("budget", "selection"), [({"tokens": 120}, "layer"), ({"fraction": 0.3}, "kv_head")]
)
def test_attended_within_bound_every_step(tiny_random, budget, selection):
    model, _ = tiny_random
    method = InfLLMMethod(budget=budget, block_size=32, selection=selection, dense_layers=1)
    engine = Engine(model, method)
    L = 400
    request = engine.new_request(L + 50, record_steps=True)
    token = int(engine.prefill(request, torch.tensor([prompt(model, L, 5)])).argmax())
    for step in range(48):
        pos = torch.tensor([[L + step]])
        token = int(engine.forward(request, torch.tensor([[token]]), pos, "decode", step).argmax())
        stats, context = engine.step_stats(request)[-1], L + step + 1
        bound = method.attended_bound(context, P)
        assert stats["attended_kv_max"] <= bound, f"step {step}"
        assert stats["attended_kv"] < context  # really sparse
        assert stats["pages_selected"] * P == pytest.approx(stats["attended_kv"])  # every selected key is visible
        budget_tokens, n_init, n_local, topk = method.split(context, P)
        assert bound <= budget_tokens + method.block_size - 1


def test_prefill_scores_equal_brute_force():
    T = 100
    cache, q = synthetic(T)
    method = InfLLMMethod(budget={"fraction": 0.5}, local_fraction=0.5, block_size=16, dense_layers=0)
    state = fresh_state(method, T)
    for lo, hi in ((0, 60), (60, T)):  # two prefill chunks
        fwd = forward_for(method, SPEC, cache, state, torch.arange(lo, hi), phase="prefill", step=-1)
        method.prefill(0, q[:, :, lo:hi], fwd)
    keys = cache.keys(0, 0, T).repeat_interleave(G, dim=1)  # [T, H, D]
    want = torch.zeros(T, H_KV)
    for i in range(T):
        n_local = method.split(i + 1, P)[2]
        probs = torch.softmax(torch.einsum("hd,thd->ht", q[0, :, i], keys[: i + 1]) * D**-0.5, dim=-1)
        lo = max(0, i + 1 - n_local)
        want[lo : i + 1] += probs[:, lo:].view(H_KV, G, -1).sum(dim=1).T
    torch.testing.assert_close(state.score[0, 0, :T], want, rtol=1e-5, atol=1e-6)


def test_prefill_scores_in_query_blocks_equal_one_block(monkeypatch):
    """A chunk's queries taken in blocks (bounded logits memory) add up to the same scores."""
    T = 100
    cache, q = synthetic(T)
    method = InfLLMMethod(budget={"fraction": 0.5}, local_fraction=0.5, block_size=16, dense_layers=0)
    scores = []
    for most in (infllm.PREFILL_LOGITS, H * 7 * (7 + T)):  # everything at once; blocks of at most 7 queries
        monkeypatch.setattr(infllm, "PREFILL_LOGITS", most)
        state = fresh_state(method, T)
        fwd = forward_for(method, SPEC, cache, state, torch.arange(0, T), phase="prefill", step=-1)
        method.prefill(0, q, fwd)
        scores.append(state.score[0, 0, :T].clone())
    n_local = method.split(T, P)[2]  # the largest of the chunk (n_local grows with the context)
    assert infllm.query_rows(H, T, n_local, H * 7 * (7 + T)) < T // 4  # the second pass really took blocks
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-6)


def test_query_rows_bound_the_logits():
    assert infllm.query_rows(32, 32768, 2048) * 32 * (infllm.query_rows(32, 32768, 2048) + 2048) <= infllm.PREFILL_LOGITS
    assert infllm.query_rows(4, 60, 30) == 60  # small chunks: one block, as before
    assert infllm.query_rows(1, 5, 1, 1) == 1


def test_decode_scores_use_the_selection_softmax():
    T = 200
    cache, q = synthetic(T, seed=1)
    method = InfLLMMethod(budget={"tokens": 100}, block_size=16, dense_layers=0)
    state = fresh_state(method, T)
    fwd = forward_for(method, SPEC, cache, state, [T - 1])
    method.prepare(fwd)
    method.decode(0, q[:, :, -1:], fwd)
    sel = method.select(0, q[:, :, -1], fwd, state)
    mask = selection_mask(sel.units, 1, T)[0]  # [H_sel, T]
    n_local = method.split(T, P)[2]
    keys = cache.keys(0, 0, T).repeat_interleave(G, dim=1)
    logits = torch.einsum("hd,thd->ht", q[0, :, -1], keys) * D**-0.5
    probs = torch.softmax(logits.masked_fill(~mask.expand(H, -1), float("-inf")), dim=-1)
    want = torch.zeros(T, H_KV)
    want[T - n_local :] = probs[:, T - n_local :].view(H_KV, G, -1).sum(dim=1).T
    torch.testing.assert_close(state.score[0, 0, :T], want)


def brute_representatives(keys, scores, block_size, repr_topk, n_init, nb):
    out = torch.zeros(nb, H_KV, D)
    for j in range(nb):
        s = n_init + j * block_size
        for g in range(H_KV):
            top = sorted(range(block_size), key=lambda t: -float(scores[s + t, g]))[:repr_topk]
            out[j, g] = torch.stack([keys[s + t, g] for t in top]).mean(dim=0)
    return out


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_representatives_and_blocks_equal_brute_force(selection):
    T = 200
    cache, q = synthetic(T, seed=2)
    method = InfLLMMethod(
        budget={"tokens": 100}, block_size=16, repr_topk=3, selection=selection, dense_layers=0
    )
    state = fresh_state(method, T)
    scores = torch.rand(T, H_KV, generator=torch.Generator().manual_seed(3))
    state.score[0, 0, :T] = scores
    budget, n_init, n_local, topk = method.split(T, P)
    nb = (T - n_local - n_init) // 16
    assert (n_init, n_local, topk, nb) == (2, 65, 2, 8)  # selection really chooses among blocks
    fwd = forward_for(method, SPEC, cache, state, [T - 1])
    method.prepare(fwd)  # builds the representatives of the formed blocks
    keys = cache.keys(0, 0, T)
    reprs = brute_representatives(keys, scores, 16, 3, n_init, nb)
    torch.testing.assert_close(state.reprs[0, 0, :nb], reprs)

    qv = q[0, :, -1]
    per_head = torch.einsum("hd,nhd->hn", qv, reprs.repeat_interleave(G, dim=1))  # [H, nb]
    grouped = per_head.sum(0, keepdim=True) if selection == "layer" else per_head.view(H_KV, G, nb).sum(1)
    sel = method.select(0, q[:, :, -1], fwd, state)
    mask = selection_mask(sel.units, sel.unit, T)[0]
    assert mask.shape == (grouped.shape[0], T) and sel.unit == 1
    for h in range(grouped.shape[0]):
        best = set(sorted(range(nb), key=lambda j: -float(grouped[h, j]))[:topk])
        want = torch.zeros(T, dtype=torch.bool)
        want[:n_init] = True
        want[n_init + nb * 16 :] = True  # remainder + local window
        for j in best:
            want[n_init + j * 16 : n_init + (j + 1) * 16] = True
        assert torch.equal(mask[h], want)
        units = sel.units[0, h]
        assert int((units >= 0).sum()) == int(want.sum()) <= int(sel.count[0])  # compact, unique
        assert torch.equal(units[: int(want.sum())].sort().values, want.nonzero().flatten())
        assert int(want.sum()) <= method.attended_bound(T, P)


def test_a_moved_n_init_rebuilds_every_representative():
    """A fraction budget moves n_init with the context: block boundaries move, representatives follow."""
    T = 700
    cache, _ = synthetic(T, seed=4)
    method = InfLLMMethod(budget={"fraction": 0.5}, block_size=16, repr_topk=2, dense_layers=0, init_fraction=0.05)
    state = fresh_state(method, T)
    state.score[0, 0, :T] = torch.rand(T, H_KV, generator=torch.Generator().manual_seed(5))
    for end in (600, 640):  # n_init = floor(0.05 * 300) = 15, then floor(0.05 * 320) = 16
        method.prepare(forward_for(method, SPEC, cache, state, [end - 1]))
        _, n_init, n_local, _ = method.split(end, P)
        nb = (end - n_local - n_init) // 16
        want = brute_representatives(cache.keys(0, 0, T), state.score[0, 0], 16, 2, n_init, nb)
        torch.testing.assert_close(state.reprs[0, 0, :nb], want)
    assert state.origin[0] == 16


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"init_fraction": 0.0}, "init_fraction"),
        ({"init_fraction": 1.0}, "init_fraction"),
        ({"local_fraction": 1.5}, "local_fraction"),
        ({"local_fraction": -0.1}, "local_fraction"),
        ({"init_fraction": 0.5, "local_fraction": 0.6}, "init_fraction \\+ method.local_fraction"),
        ({"block_size": 0}, "block_size"),
        ({"repr_topk": 0}, "repr_topk"),
        ({"repr_topk": 200}, "repr_topk"),
        ({"selection": "q_head"}, "selection=q_head is not supported for infllm"),
        ({"selection": "bogus"}, "selection"),
        ({"budget": {"fraction": 1.5}}, "budget.fraction"),
    ],
)
def test_invalid_settings(overrides, key):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        InfLLMMethod(**overrides)


def test_block_size_must_be_a_page_multiple(tiny_random):
    model, _ = tiny_random
    with pytest.raises(ConfigError, match="method.block_size=24 must be a multiple of engine.page_size=16"):
        Engine(model, InfLLMMethod(block_size=24)).new_request(64)


def test_state_hygiene(tiny_random):
    model, _ = tiny_random
    method = InfLLMMethod(budget={"tokens": 96}, block_size=16, dense_layers=1)
    a, b = prompt(model, 300, 3), prompt(model, 220, 4)
    engine = Engine(model, method)
    engine.generate(a, 24)
    after = engine.generate(b, 24, keep_logits=True)
    fresh = Engine(model, InfLLMMethod(budget={"tokens": 96}, block_size=16, dense_layers=1)).generate(
        b, 24, keep_logits=True
    )
    assert after.tokens == fresh.tokens and torch.equal(after.logits, fresh.logits)
    assert after.stats["attended_kv"] == fresh.stats["attended_kv"] < 220
