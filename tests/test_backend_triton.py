"""``engine.backend=triton`` against ``engine.backend=torch``: one method code, two op tables.

For every method and setting (full; quest per KV head / query head / layer; oracle tokens and
pages; InfLLM; StreamingLLM; TOVA; RetroAttention over quest, InfLLM and the oracle, with
recomputed and cached past queries) both backends must generate the same greedy tokens, logits
within fp32 tolerance and the same accounting (attended / resident KV, pages, exposure, ...),
free-running and teacher-forced. Budgets are small so selection, eviction and the retrospective
window all matter. The Triton path must really run: the reference ops are poisoned while the
triton backend runs and every kernel op must have been called (no silent fallback); without a GPU
or ``TRITON_INTERPRET=1`` these tests fail rather than skip. The degenerate settings are exact on
the triton backend too (window 1 = the base method, an unlimited budget = full attention).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import Counter
import pytest
import torch
from harness import METHOD_CASES as CASES
from harness import make_case as make
from harness import random_prompt as _prompt

from retrobench.engine import Engine
from retrobench.kernels import dense, kv_write, page_meta, paged_attention, quest, retro, scores, topk
from retrobench.kernels._triton import triton_usable
from retrobench.kernels.ops import TRITON_OPS

pytest.importorskip("triton")

# retro over quest (kv_head selection) runs every op quest-kv_head runs (page_scores, update_page_minmax,
# topk, sparse_attention) plus retro_upkeep; quest-kv_head itself is checked on tiny_random.
SMOLLM2_CASES = ("retro-quest-w2",)
REFS = {
    paged_attention: "sparse_paged_attention_ref", quest: "quest_page_scores_ref", topk: "topk_forced_ref",
    page_meta: "update_page_minmax_ref", kv_write: "write_kv_ref",
    scores: "paged_logits_ref", dense: "dense_attention_ref", retro: "mark_loaded_ref",
}  # fmt: skip


def counting_triton_ops() -> tuple[object, Counter]:
    """The triton op table with a call counter around every op."""
    calls: Counter = Counter()

    def wrap(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return run

    return dataclasses.replace(TRITON_OPS, **{n: wrap(n, f) for n, f in TRITON_OPS.impl().items()}), calls


def require_triton_here(device: str = "cpu") -> None:
    if not triton_usable(torch.empty(0, device=device)):
        pytest.fail("the triton backend cannot run here: set TRITON_INTERPRET=1 before Python starts (make test does)")


def both_backends(model, name: str, prompt: list[int], n: int, teacher: list[int], monkeypatch, **engine_kw):
    """Greedy generations and teacher-forced logits of one case on both backends (triton checked to run)."""
    runs = {}
    for backend in ("torch", "triton"):
        engine = Engine(model, make(name), page_size=8, prefill_chunk=32, backend=backend, **engine_kw)
        calls = None
        if backend == "triton":
            assert engine.ops.name == "triton" and engine.ops.capturable
            engine.ops, calls = counting_triton_ops()
            with monkeypatch.context() as m:  # a kernel wrapper that fell back to its reference would raise
                for module, ref in REFS.items():
                    m.setattr(module, ref, _poisoned(ref))
                gen = engine.generate(prompt, n, keep_logits=True)
                forced = engine.generate(prompt, 0, teacher_tokens=teacher, keep_logits=True)
        else:
            gen = engine.generate(prompt, n, keep_logits=True)
            forced = engine.generate(prompt, 0, teacher_tokens=teacher, keep_logits=True)
        runs[backend] = (gen, forced, calls)
    return runs


def _poisoned(name: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran while engine.backend=triton was selected")

    return fail


def assert_equivalent(runs, name: str, atol: float = 1e-4) -> None:
    (g_ref, f_ref, _), (g, f, calls) = runs["torch"], runs["triton"]
    assert g.tokens == g_ref.tokens, f"{name}: tokens differ"
    torch.testing.assert_close(g.logits, g_ref.logits, rtol=atol, atol=atol * float(g_ref.logits.abs().max()))
    torch.testing.assert_close(f.logits, f_ref.logits, rtol=atol, atol=atol * float(f_ref.logits.abs().max()))
    for ours, ref in ((g.stats, g_ref.stats), (f.stats, f_ref.stats)):
        keys = set(ref) - {"peak_memory_bytes"}
        assert set(ours) - {"peak_memory_bytes"} == keys, f"{name}: accounting keys differ"
        for key in keys:
            assert ours[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), f"{name}: {key}"
    assert calls["prefill_attention"] > 0 and calls["write_kv"] > 0, f"{name}: the triton ops never ran {dict(calls)}"  # prefill
    assert (calls["sparse_attention"] > 0) == (name != "full"), f"{name}: sparse_attention {calls['sparse_attention']}"
    needed = {"page_scores": "quest" in name or name.startswith("retro-quest"),
              "paged_logits": any(k in name for k in ("oracle", "infllm", "tova")),
              "mark_loaded": name.startswith("retro") and "-w1" in name,  # w = 1: no past rows to merge
              "retro_upkeep": name.startswith("retro") and "-w1" not in name,
              "update_page_minmax": "quest" in name}  # fmt: skip
    for op, used in needed.items():
        assert (calls[op] > 0) == used, f"{name}: {op} called {calls[op]} times"


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_backend_equals_torch_backend(tiny_random, name: str, monkeypatch) -> None:
    require_triton_here()
    model, _ = tiny_random
    prompt = _prompt(69, model.config.vocab_size, 1)  # 69 = 8 pages of 8 + 5: the current page is partial
    # 8 decode steps cross into a new page (69 + 8 > 72) and fill retro's windows (2, 3) several times
    runs = both_backends(model, name, prompt, 8, _prompt(6, model.config.vocab_size, 2), monkeypatch)
    assert_equivalent(runs, name)


@pytest.mark.parametrize("name", SMOLLM2_CASES)
def test_triton_backend_equals_torch_backend_smollm2(smollm2, name: str, monkeypatch) -> None:
    """The real GQA model (9 query / 3 KV heads, D = 64) in its first 8 of 30 layers, a short prompt:
    the interpreter's cost is per layer, and the heads' shapes, not the depth, are what this case adds
    to tiny_random's."""
    require_triton_here()
    model, _ = smollm2
    # the config is the one the model's own modules read (HF's forward runs config.num_hidden_layers layers)
    monkeypatch.setattr(model.config, "num_hidden_layers", 8)
    prompt = _prompt(45, model.config.vocab_size, 3)
    runs = both_backends(model, name, prompt, 4, _prompt(3, model.config.vocab_size, 4), monkeypatch)
    assert_equivalent(runs, name, atol=2e-4)


@pytest.mark.parametrize("base", ["quest", "oracle", "infllm"])
def test_window_one_is_exactly_the_base_on_triton(tiny_random, base: str) -> None:
    require_triton_here()
    model, _ = tiny_random
    prompt = _prompt(69, model.config.vocab_size, 5)
    name = {"quest": "quest-kv_head", "oracle": "oracle-token", "infllm": "infllm-layer"}[base]
    base_method = make(name)
    retro_name = {"quest": "retro-quest-w2", "oracle": "retro-oracle-w2", "infllm": "retro-infllm-w2"}[base]
    retro = make(retro_name, window=1)
    assert retro.base == base and retro.selector.settings() == base_method.settings()
    ref = Engine(model, base_method, page_size=8, backend="triton").generate(prompt, 10, keep_logits=True)
    ours = Engine(model, retro, page_size=8, backend="triton").generate(prompt, 10, keep_logits=True)
    assert ours.tokens == ref.tokens and torch.equal(ours.logits, ref.logits)


@functools.lru_cache(maxsize=1)
def _full_on_triton(model, prompt: tuple[int, ...]):
    """Full attention's 10 greedy tokens on the triton backend, run once for every method below."""
    return Engine(model, make("full"), page_size=8, backend="triton").generate(list(prompt), 10, keep_logits=True)


@pytest.mark.parametrize("method", sorted({m for m, _ in CASES.values()}))
def test_unlimited_budget_equals_full_on_triton(tiny_random, method: str) -> None:
    require_triton_here()
    model, _ = tiny_random
    prompt = _prompt(50, model.config.vocab_size, 6)
    name = next(n for n, (m, _) in CASES.items() if m == method)
    extra = {"budget": {"tokens": 10**6, "fraction": None}} if method != "full" else {}
    full = _full_on_triton(model, tuple(prompt))
    ours = Engine(model, make(name, **extra), page_size=8, backend="triton").generate(prompt, 10, keep_logits=True)
    assert ours.tokens == full.tokens
    torch.testing.assert_close(ours.logits, full.logits, rtol=1e-5, atol=1e-5 * float(full.logits.abs().max()))


def test_triton_backend_without_a_kernel_device_is_a_config_error(tiny_random, monkeypatch) -> None:
    from retrobench.kernels import _triton
    from retrobench.methods.base import ConfigError

    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(ConfigError, match="engine.backend=triton"):
        Engine(tiny_random[0], make("full"), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_backend_equals_torch_backend_gpu(tiny_random, name: str, cuda_graphs: bool, monkeypatch) -> None:
    """The same on the GPU (native Triton; the CUDA-graph step and the eager one) against
    ``backend=torch`` on the GPU; fp32 with TF32 off so both sides round alike."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = copy.deepcopy(tiny_random[0]).to("cuda")
    prompt = _prompt(69, model.config.vocab_size, 1)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = both_backends(model, name, prompt, 12, _prompt(9, model.config.vocab_size, 2), monkeypatch,
                             cuda_graphs=cuda_graphs)  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert_equivalent(runs, name)
