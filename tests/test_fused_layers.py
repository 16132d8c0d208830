"""The fused decoder layers (``retrobench/engine/layers.py``) against transformers' own modules.

Uncompiled, the fused functions repeat transformers' Llama layer op for op, so on CPU (fp32) every
method's generations through them equal the transformers path: the same tokens, logits and
accounting, free-running, teacher-forced and batched. Fusing the Q/K/V and gate/up weights
re-points the model's parameters into one storage without changing any output and without
allocating again for a second engine. ``engine.compile`` resolves and fails as documented. On the
GPU (``-m gpu``) the compiled layers inside CUDA graphs equal the uncompiled ones (and the torch
backend) within fp32 tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import make_case as make
from harness import random_prompt as _prompt

from retrobench.engine import Engine
from retrobench.engine.layers import FusedLayers, fuse_rows, unsupported_reason
from retrobench.methods.base import ConfigError

CASES = ("full", "quest-kv_head", "retro-quest-w2", "retro-infllm-w3-cached", "tova", "streaming", "oracle-token")


def _pair(model, name: str, backend: str = "torch", **kw):
    hf = Engine(model, make(name), page_size=8, prefill_chunk=32, backend=backend, compile=False, fused_layers=False,
                **kw)  # fmt: skip
    fused = Engine(model, make(name), page_size=8, prefill_chunk=32, backend=backend, compile=False,
                   fused_layers=True, **kw)  # fmt: skip
    assert hf.layers is None and isinstance(fused.layers, FusedLayers)
    return hf, fused


def _same(a, b, name: str, atol: float = 1e-5) -> None:
    assert a.tokens == b.tokens, f"{name}: tokens differ"
    if b.logits is not None:
        torch.testing.assert_close(a.logits, b.logits, rtol=atol, atol=atol * float(b.logits.abs().max()))
    keys = set(b.stats) - {"peak_memory_bytes"}
    assert set(a.stats) - {"peak_memory_bytes"} == keys
    for key in keys:
        assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-6, abs=1e-9), f"{name}: {key}"


@pytest.mark.parametrize("name", CASES)
def test_fused_layers_equal_transformers_modules(tiny_random, name: str) -> None:
    model, _ = tiny_random
    prompt, teacher = _prompt(69, model.config.vocab_size, 11), _prompt(7, model.config.vocab_size, 12)
    hf, fused = _pair(model, name)
    _same(fused.generate(prompt, 10, keep_logits=True), hf.generate(prompt, 10, keep_logits=True), name)
    _same(fused.generate(prompt, 0, teacher_tokens=teacher, keep_logits=True),
          hf.generate(prompt, 0, teacher_tokens=teacher, keep_logits=True), name)  # fmt: skip


def test_fused_layers_equal_transformers_modules_triton_batched(tiny_random) -> None:
    """Continuous batching: three jobs in rows of two."""
    from retrobench.engine.batch import Job

    model, _ = tiny_random
    jobs = [Job(prompt_ids=_prompt(n, model.config.vocab_size, 20 + n), max_new_tokens=k)
            for n, k in ((40, 6), (57, 3), (33, 5))]  # fmt: skip
    out = {}
    for label, engine in zip(("hf", "fused"), _pair(model, "retro-quest-w2")):
        got: dict[int, object] = {}
        engine.generate_batch(jobs, 2, lambda i, g, got=got: got.__setitem__(i, g))
        out[label] = got
    for i in range(len(jobs)):
        _same(out["fused"][i], out["hf"][i], f"job {i}")


def test_fused_layers_equal_transformers_modules_smollm2(smollm2) -> None:
    """The real GQA model (9 query / 3 KV heads, 30 layers, tied embeddings)."""
    model, _ = smollm2
    prompt = _prompt(45, model.config.vocab_size, 3)
    hf, fused = _pair(model, "quest-kv_head")
    _same(fused.generate(prompt, 4, keep_logits=True), hf.generate(prompt, 4, keep_logits=True), "smollm2", 2e-5)


def test_fusing_keeps_outputs_and_shares_storage(tiny_random) -> None:
    model = copy.deepcopy(tiny_random[0])
    ids = torch.tensor([_prompt(20, model.config.vocab_size, 5)])
    before = model(input_ids=ids).logits
    attn = model.model.layers[0].self_attn
    first = FusedLayers(model).layers[0].wqkv
    assert attn.q_proj.weight.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert attn.v_proj.weight.data_ptr() == first.data_ptr() + (attn.q_proj.weight.numel() + attn.k_proj.weight.numel()) * first.element_size()
    again = FusedLayers(model).layers[0].wqkv  # a second engine: a view of the same storage, no copy
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, first)
    assert torch.equal(model(input_ids=ids).logits, before)
    lin = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)]
    expected = torch.cat([m.weight.detach() for m in lin])
    assert torch.equal(fuse_rows(lin), expected) and torch.equal(fuse_rows(lin), expected)


def test_engine_compile_setting(tiny_random) -> None:
    model, _ = tiny_random
    assert unsupported_reason(model) is None
    auto = Engine(model, make("full"), backend="torch")
    assert auto.compile is False  # auto: only with CUDA graphs on a GPU
    assert isinstance(auto.layers, FusedLayers)  # on CPU the fused layers run uncompiled by default
    assert Engine(model, make("full"), backend="torch", fused_layers=False).layers is None
    with pytest.raises(ConfigError, match="engine.compile must be auto, true or false, got 'yes'"):
        Engine(model, make("full"), compile="yes")
    other = copy.deepcopy(model)
    other.config.model_type = "gemma"
    assert "model_type 'gemma'" in unsupported_reason(other)
    with pytest.raises(ConfigError, match="engine.compile=true cannot run this model: model_type 'gemma'"):
        Engine(other, make("full"), compile=True)
    assert Engine(other, make("full"), compile="auto").layers is None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("full", "quest-kv_head", "retro-quest-w2", "retro-infllm-w3-cached", "tova"))
def test_compiled_layers_equal_uncompiled_gpu(tiny_random, name: str) -> None:
    """engine.compile=true (torch.compile'd fused layers captured in CUDA graphs) against the
    transformers modules on the same triton backend, and against the torch backend; fp32, TF32 off."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = copy.deepcopy(tiny_random[0]).to("cuda")
    prompt, teacher = _prompt(69, model.config.vocab_size, 1), _prompt(9, model.config.vocab_size, 2)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = {}
        for label, kw in (("torch", {"backend": "torch"}), ("modules", {"backend": "triton", "compile": False}),
                          ("compiled", {"backend": "triton", "compile": True})):  # fmt: skip
            engine = Engine(model, make(name), page_size=8, prefill_chunk=32, **kw)
            assert engine.compile == (label == "compiled") and engine.graphs_enabled == (label != "torch")
            runs[label] = (engine.generate(prompt, 12, keep_logits=True),
                           engine.generate(prompt, 0, teacher_tokens=teacher, keep_logits=True))  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert Engine(model, make(name), backend="triton").compile is True  # auto on a GPU
    for ref in ("modules", "torch"):
        for ours, theirs in zip(runs["compiled"], runs[ref]):
            _same(ours, theirs, f"{name} compiled vs {ref}", atol=1e-4)
