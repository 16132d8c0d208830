"""``engine.backend=triton`` (retrobench/engine/fast.py) against the reference backend.

The static-shape decode step (Triton kernels; the interpreter on CPU) must produce the same tokens
as ``backend=torch`` for every method it covers, with budgets small enough that selection,
the retrospective window and its output cache all matter, and reject the rest by name.
"""

from __future__ import annotations

import pytest
import torch
from retrobench.methods.base import ConfigError
from retrobench.methods.full import FullMethod
from retrobench.methods.quest import QuestMethod
from retrobench.methods.retro import RetroMethod
from retrobench.methods.streaming import StreamingMethod

from retrobench.engine import Engine

pytest.importorskip("triton")

CASES = {
    "full": lambda: FullMethod(),
    "quest": lambda: QuestMethod(budget={"tokens": 24}, dense_layers=1),
    "quest-layer": lambda: QuestMethod(budget={"fraction": 0.2}, selection="layer", dense_layers=1),
    "retro-w1": lambda: RetroMethod(window=1, budget={"tokens": 24}, dense_layers=1),
    "retro-w2": lambda: RetroMethod(window=2, budget={"tokens": 24}, dense_layers=1),
    "retro-w3": lambda: RetroMethod(window=3, budget={"fraction": 0.2}, dense_layers=1),
}


def _prompt(n: int) -> list[int]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n,), generator=g).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_backend_generates_the_reference_tokens(tiny_random, case: str) -> None:
    model, _ = tiny_random
    prompt = _prompt(77)  # 77 = 9 pages of 8 + 5: the current page is partial
    runs = {}
    for backend in ("torch", "triton"):
        engine = Engine(model, CASES[case](), page_size=8, prefill_chunk=32, backend=backend)
        runs[backend] = engine.generate(prompt, 14, keep_logits=True)
    assert runs["triton"].tokens == runs["torch"].tokens
    torch.testing.assert_close(runs["triton"].logits, runs["torch"].logits, rtol=1e-4, atol=1e-4)


def test_teacher_forced_logits_match_with_a_changing_selection(tiny_random) -> None:
    """Teacher forcing along other tokens: the retro output cache and A must track the reference."""
    model, _ = tiny_random
    prompt, teacher = _prompt(70), _prompt(12)
    out = {}
    for backend in ("torch", "triton"):
        engine = Engine(
            model, RetroMethod(window=4, budget={"tokens": 16}, dense_layers=1), page_size=4, backend=backend
        )
        out[backend] = engine.generate(prompt, 0, teacher_tokens=teacher, keep_logits=True).logits
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: StreamingMethod(), "method=streaming"),
        (lambda: QuestMethod(selection="q_head"), "method.selection=q_head"),
        (lambda: RetroMethod(past_query="cached"), "method.past_query"),
        (lambda: RetroMethod(base="oracle"), "method.base=quest"),
    ],
)
def test_uncovered_settings_are_rejected_by_name(tiny_random, make, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Engine(tiny_random[0], make(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_backend_on_the_gpu_generates_the_reference_tokens(tiny_random, case: str, cuda_graphs: bool) -> None:
    """The same on the GPU (native Triton, the captured CUDA-graph step and the eager one) against
    ``backend=torch`` on the GPU; fp32 with TF32 off so both sides round alike."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import copy

    model = copy.deepcopy(tiny_random[0]).to("cuda")
    prompt = _prompt(77)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = {}
        for backend in ("torch", "triton"):
            engine = Engine(model, CASES[case](), page_size=8, prefill_chunk=32, backend=backend,
                            cuda_graphs=cuda_graphs)  # fmt: skip
            runs[backend] = engine.generate(prompt, 14, keep_logits=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert runs["triton"].tokens == runs["torch"].tokens
    torch.testing.assert_close(runs["triton"].logits, runs["torch"].logits, rtol=1e-4, atol=1e-4)
