"""The CPU check for what breaks a CUDA-graph capture of the decode step.

On a GPU, a decode step replayed from a CUDA graph must not synchronise with the host nor build
tensors from host data; on CPU neither fails by itself (one such line once broke every graph run
without any CPU test failing). ``Engine(capture_check=True)`` runs decode steps under
``CaptureGuard``: every method and setting of the backend matrix must pass it (with the torch op
table, whose references are opaque, and with the triton one, whose pure-torch ops are checked
too), and a method with the original bug must fail it, naming the operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_backend_triton import CASES, _prompt, make

from retrobench.engine import Engine
from retrobench.engine.graphs import CaptureError, CaptureGuard
from retrobench.kernels._triton import triton_usable
from retrobench.methods.streaming import StreamingMethod


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_decodes_without_capture_hazards(tiny_random, name: str) -> None:
    model, _ = tiny_random
    prompt = _prompt(69, model.config.vocab_size, 1)
    engine = Engine(model, make(name), page_size=8, prefill_chunk=32, capture_check=True)
    reference = Engine(model, make(name), page_size=8, prefill_chunk=32).generate(prompt, 10, keep_logits=True)
    checked = engine.generate(prompt, 10, keep_logits=True)
    assert checked.tokens == reference.tokens and torch.equal(checked.logits, reference.logits)


@pytest.mark.parametrize("name", ["quest-q_head", "retro-infllm-w3-cached", "oracle-token", "tova"])
def test_triton_ops_decode_without_capture_hazards(tiny_random, name: str) -> None:
    """The triton table's pure-torch ops (top-k, K/V write) run inside the check too."""
    if not triton_usable(torch.empty(0)):
        pytest.fail("set TRITON_INTERPRET=1 before Python starts (make test does)")
    model, _ = tiny_random
    engine = Engine(model, make(name), page_size=8, prefill_chunk=32, backend="triton", capture_check=True)
    assert len(engine.generate(_prompt(69, model.config.vocab_size, 1), 6).tokens) == 6


@dataclass
class HostScalarStreaming(StreamingMethod):
    """StreamingLLM with the bug that once broke every CUDA-graph run: a Python scalar assigned by index."""

    name: ClassVar[str] = "streaming_bug"

    def _evict(self, fwd) -> None:
        fwd.state.live[torch.arange(fwd.batch, device=fwd.pos.device).unsqueeze(1), fwd.pos] = True
        super()._evict(fwd)


def test_the_original_bug_is_caught(tiny_random) -> None:
    model, _ = tiny_random
    prompt = _prompt(40, model.config.vocab_size, 2)
    Engine(model, HostScalarStreaming(budget={"tokens": 24}), page_size=8).generate(prompt, 3)  # fine on CPU ...
    with pytest.raises(CaptureError, match="host data"):  # ... but not capturable
        Engine(model, HostScalarStreaming(budget={"tokens": 24}), page_size=8, capture_check=True).generate(prompt, 3)


@pytest.mark.parametrize(
    ("hazard", "match"),
    [
        (lambda t: int(t.sum()), "host synchronisation"),
        (lambda t: t[t > 0], "boolean-mask"),
        (lambda t: torch.tensor([1, 2]) + t[:2], "host data"),
        (lambda t: t.nonzero(), "data-dependent"),
    ],
    ids=["item", "bool-index", "host-tensor", "nonzero"],
)
def test_guard_names_each_hazard(hazard, match) -> None:
    t = torch.arange(5.0)
    with pytest.raises(CaptureError, match=match), CaptureGuard():
        hazard(t)
    with CaptureGuard() as guard:  # static-shape device work passes
        guard.opaque(lambda x: int(x.sum()))(t)  # a kernel launch is opaque
        torch.where(t > 2, t, 0.0).topk(2)
