"""RetroAttention against its definition: base equivalence, merge exactness, the union property in
the first sparse layer, exposure without double counting, KV overwrite, constant output cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import selection_mask

from retrobench.engine import Engine
from retrobench.kernels.attention_ref import attention_ref, merge_states_ref
from retrobench.methods.full import FullMethod
from retrobench.methods.quest import QuestMethod
from retrobench.methods.retro import RetroMethod, selecting_methods

BASES = ("infllm", "oracle", "quest")


def prompt(model, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size - 4, (n,), generator=gen).tolist()


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("base", sorted(BASES))
def test_window_one_is_exactly_the_base(tiny_random, base):
    model, _ = tiny_random
    ids = prompt(model, 180, 1)
    budget = {"tokens": 40}
    base_method = selecting_methods()[base](budget=budget)
    reference = Engine(model, base_method).generate(ids, 48, keep_logits=True)
    ours = Engine(model, RetroMethod(base=base, window=1, budget=budget)).generate(ids, 48, keep_logits=True)
    assert ours.tokens == reference.tokens
    assert torch.equal(ours.logits, reference.logits)


@settings(max_examples=80, deadline=None)
@given(t=st.integers(1, 40), split=st.data(), heads=st.sampled_from([(1, 1), (4, 2), (6, 3)]), seed=st.integers(0, 999))
def test_merge_of_disjoint_sets_equals_attention_over_union(t, split, heads, seed):
    H, H_kv = heads
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(H, 2, 8, generator=gen), torch.randn(t, H_kv, 8, generator=gen), torch.randn(t, H_kv, 8, generator=gen)
    side = torch.tensor(split.draw(st.lists(st.booleans(), min_size=t, max_size=t)))  # either side may be empty
    a = side.view(1, 1, t).expand(H_kv, 2, t)
    out_a, lse_a = attention_ref(q, k, v, 0.3, a)
    out_b, lse_b = attention_ref(q, k, v, 0.3, ~a)
    out, lse = merge_states_ref(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = attention_ref(q, k, v, 0.3, None)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    empty_out, empty_lse = attention_ref(q, k, v, 0.3, torch.zeros_like(a))
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()
    same, same_lse = merge_states_ref(ref_out, ref_lse, empty_out, empty_lse)  # merging nothing is the identity
    torch.testing.assert_close(same, ref_out, rtol=0, atol=0)


@dataclass
class RecordingQuest(QuestMethod):
    """Quest that logs every selection (layer, ``[H_sel, T]`` key mask of sequence 0) in call order."""

    name: ClassVar[str] = "quest"
    log: list = field(default_factory=list)

    def select(self, layer, q, fwd, state):
        sel = super().select(layer, q, fwd, state)
        self.log.append((layer, selection_mask(sel.units, sel.unit, int(fwd.ends[0]))[0]))
        return sel


@dataclass
class CaptureRetro(RetroMethod):
    """RetroAttention that records each decode call's positions, query and output (test double)."""

    name: ClassVar[str] = "retro"
    calls: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.selector = RecordingQuest(budget=self.budget, selection=self.selection, dense_layers=self.dense_layers)

    def decode(self, layer, q, fwd) -> Any:
        out, lse = super().decode(layer, q, fwd)
        self.calls[(layer, int(fwd.step[0]))] = (fwd.pos[0].clone(), q[0].clone(), out[0].clone())
        return out, lse


def run_retro(model, window: int, steps: int, budget: int = 32, prompt_len: int = 160):
    method = CaptureRetro(window=window, budget={"tokens": budget})
    engine = Engine(model, method)
    gen = engine.generate(prompt(model, prompt_len, 2), steps + 1, keep_logits=True)
    return method, engine, gen


def selections_by_step(method: CaptureRetro, num_layers: int) -> dict[tuple[int, int], torch.Tensor]:
    sparse = num_layers - method.dense_layers
    return {(layer, i // sparse): mask for i, (layer, mask) in enumerate(method.selector.log)}


@pytest.mark.parametrize("window", [2, 3])
def test_first_sparse_layer_output_is_attention_over_the_union(tiny_random, window):
    model, _ = tiny_random
    method, engine, gen = run_retro(model, window, steps=12)
    layer = method.dense_layers  # first sparse layer: a past token's query never changes here
    sel = selections_by_step(method, model.config.num_hidden_layers)
    request_keys = None
    for s in range(0, 12 - window + 1):
        last = s + window - 1
        positions, _, out = method.calls[(layer, last)]
        row = (positions == positions[-1] - (window - 1)).nonzero().item()
        p = int(positions[row])
        _, q_own, _ = method.calls[(layer, s)]
        union = torch.zeros_like(sel[(layer, last)][:, : p + 1])
        for j in range(s, last + 1):
            union |= sel[(layer, j)][:, : p + 1]
        if request_keys is None:  # layer-`layer` K/V of positions <= p never change (dense layers below)
            request_keys = _layer_kv(engine, model, gen, layer)
        k, v = request_keys[0][: p + 1], request_keys[1][: p + 1]
        expected, _ = attention_ref(q_own[:, -1:], k, v, engine.scaling, union.unsqueeze(1))
        rel_close(out[:, row], expected[:, 0])


def _layer_kv(engine: Engine, model, gen, layer: int):
    """K/V of a layer below any revision, recomputed by a fresh full-attention run on the same tokens."""
    full = Engine(model, FullMethod())
    request = full.new_request(len(gen.tokens) + 200)
    ids = prompt(model, 160, 2) + gen.tokens
    full.prefill(request, torch.tensor([ids]))
    return request.cache.keys(layer, 0, len(ids)).clone(), request.cache.values(layer, 0, len(ids)).clone()


@pytest.mark.parametrize("window", [2, 4, 8])
def test_exposure_equals_brute_force_from_logged_selections(tiny_random, window):
    model, _ = tiny_random
    steps = 20
    method, engine, gen = run_retro(model, window, steps=steps, budget=24)
    sel = selections_by_step(method, model.config.num_hidden_layers)
    L0 = 160
    ratios_by_step: dict[int, list[float]] = {}
    for s in range(0, steps - window + 1):
        p = L0 + s
        for layer in range(method.dense_layers, model.config.num_hidden_layers):
            own = sel[(layer, s)][:, : p + 1]
            union = own.clone()
            for j in range(s + 1, s + window):
                union |= sel[(layer, j)][:, : p + 1]
            ratio = (union.sum(-1).float() / own.sum(-1).float()).mean()
            ratios_by_step.setdefault(s + window - 1, []).append(float(ratio))
    stats = gen.stats  # mean over steps of the exposure finalised at each step
    expected = sum(sum(r) / len(r) for r in ratios_by_step.values()) / len(ratios_by_step)
    assert abs(stats["exposure"] - expected) < 1e-6
    if window > 1:
        assert stats["exposure"] > 1.0


def test_kv_overwrite_matches_recomputation_from_revised_outputs(tiny_random):
    model, _ = tiny_random
    method = CaptureRetro(window=2, budget={"tokens": 24})
    engine = Engine(model, method)
    request = engine.new_request(400, record_steps=True)
    ids = prompt(model, 160, 3)
    logits = engine.prefill(request, torch.tensor([ids]))
    tokens = [int(logits.argmax())]
    snapshots = []
    for step in range(8):
        lo = max(0, len(tokens) - 2)
        pos = torch.arange(160 + lo, 160 + len(tokens)).unsqueeze(0)
        logits = engine.forward(request, torch.tensor([tokens[lo:]]), pos, "decode", step)
        tokens.append(int(logits.argmax()))
        snapshots.append((request.cache.k.clone(), request.cache.v.clone()))
    assert any(s.get("supplement_kv", 0) > 0 for s in engine.step_stats(request))
    first_sparse = method.dense_layers
    changed = 0
    for step in range(1, 8):
        p = 160 + step - 1  # the past token re-run at this step
        before_k, _ = snapshots[step - 1]
        after_k, after_v = snapshots[step]
        for layer in range(model.config.num_hidden_layers):
            diff = float((after_k[layer].reshape(-1, *after_k.shape[-2:])[p] - before_k[layer].reshape(-1, *before_k.shape[-2:])[p]).abs().max())
            if layer <= first_sparse:
                assert diff < 1e-5, f"layer {layer} (not above the first sparse layer) changed by {diff}"
            elif diff > 1e-4:
                changed += 1
        k_ref, v_ref = _recompute_kv(model, engine, method, tokens[step - 1], p, step)
        for layer in range(model.config.num_hidden_layers):
            rel_close(after_k[layer].reshape(-1, *after_k.shape[-2:])[p], k_ref[layer])
            rel_close(after_v[layer].reshape(-1, *after_v.shape[-2:])[p], v_ref[layer])
    assert changed > 0


def _recompute_kv(model, engine, method: CaptureRetro, token: int, p: int, step: int):
    """From scratch: run token ``token`` at position ``p`` through the layers with the attention
    output of each layer replaced by the revised output the method returned at ``step``."""
    inner = model.model
    h = inner.embed_tokens(torch.tensor([[token]]))
    cos, sin = inner.rotary_emb(h, torch.tensor([[p]]))
    ks, vs = [], []
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        for layer_idx, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            H_kv, D = model.config.num_key_value_heads, attn.head_dim
            k = attn.k_proj(x).view(1, 1, H_kv, D).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, H_kv, D).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            ks.append(k[0, :, 0])
            vs.append(v[0, :, 0])
            positions, _, out = method.calls[(layer_idx, step)]  # dense layers are recorded too
            row = (positions == p).nonzero().item()
            h = h + attn.o_proj(out[:, row].reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return ks, vs


def test_output_cache_is_constant_over_512_steps(tiny_random):
    """The output cache is preallocated for w-1 past tokens and never grows; its slots hold exactly
    the last w-1 generated tokens' merged outputs."""
    model, _ = tiny_random
    method = RetroMethod(window=4, budget={"tokens": 64})
    gen_engine = Engine(model, method)
    request = gen_engine.new_request(800, record_steps=True)
    shapes = {name: tuple(getattr(request.state, name).shape) for name in ("out", "lse", "own", "exposed")}
    logits = gen_engine.prefill(request, torch.tensor([prompt(model, 100, 4)]))
    tokens = [int(logits.argmax())]
    for step in range(512):
        lo = max(0, len(tokens) - 4)
        pos = torch.arange(100 + lo, 100 + len(tokens)).unsqueeze(0)
        logits = gen_engine.forward(request, torch.tensor([tokens[lo:]]), pos, "decode", step)
        tokens.append(int(logits.argmax()))
    sizes = {s["output_cache_bytes"] for s in gen_engine.step_stats(request)}
    assert len(sizes) == 1 and sizes.pop() > 0
    assert {name: tuple(getattr(request.state, name).shape) for name in shapes} == shapes
    L, slots = model.config.num_hidden_layers, method.window - 1
    assert shapes["out"][:3] == (L, 1, slots)
    assert torch.isfinite(request.state.lse[method.dense_layers :]).all()  # every slot holds a token
    assert torch.isneginf(request.state.lse[: method.dense_layers]).all()  # dense layers keep none


@pytest.mark.parametrize("window", [1, 2, 4, 8])
def test_unlimited_budget_equals_full_for_every_window(tiny_random, window):
    model, _ = tiny_random
    ids = prompt(model, 120, 5)
    full = Engine(model, FullMethod()).generate(ids, 32, keep_logits=True)
    retro = Engine(model, RetroMethod(window=window, budget={"tokens": 10**6})).generate(ids, 32, keep_logits=True)
    assert retro.tokens == full.tokens
    rel_close(retro.logits, full.logits)
    assert retro.stats["exposure"] == 1.0
