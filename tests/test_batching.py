"""Continuous batching (``Engine.generate_batch``) against batch 1, for every method.

A batch of B rows decodes prompts of different lengths with different token limits, so rows
finish at different steps and are refilled from the waiting jobs (and, with fewer jobs than rows
left, keep replaying their last step). Every sequence must come out as it does alone: the same
greedy tokens and the same accounting (attended / resident KV, pages, exposure, ...), sampled
sequences the same draws from their own seeds. On the GPU the batched steps run as CUDA graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import METHOD_CASES, make_case, random_prompt

from retrobench.engine import Engine, Job, Sampling

STATS = ("attended_kv", "attended_kv_max", "resident_kv", "pages_selected", "exposure", "supplement_kv",
         "budget_kv", "context", "output_cache_bytes", "kv_bytes")  # fmt: skip


def _jobs(vocab: int, n: int = 5, seed: int = 0, sampled: bool = False) -> list[Job]:
    """Prompts of 21..60 tokens (partial last pages), 3..14 new tokens: rows finish at different steps."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(21, 61, (n,), generator=gen).tolist()
    limits = torch.randint(3, 15, (n,), generator=gen).tolist()
    return [
        Job(random_prompt(L, vocab, seed * 100 + i), m, Sampling(temperature=0.8 if sampled else 0.0, seed=i))
        for i, (L, m) in enumerate(zip(lengths, limits))
    ]


def _batched(engine: Engine, jobs: list[Job], batch: int, **kw) -> list:
    out: list = [None] * len(jobs)
    order: list[int] = []

    def done(i: int, gen) -> None:
        assert out[i] is None, f"job {i} finished twice"
        out[i] = gen
        order.append(i)

    engine.generate_batch(jobs, batch, done, **kw)
    assert sorted(order) == list(range(len(jobs))), "a job never finished"
    return out


def _alone(engine: Engine, jobs: list[Job], **kw) -> list:
    return [engine.generate(j.prompt_ids, j.max_new_tokens, sampling=j.sampling, **kw) for j in jobs]


def assert_same(batched: list, alone: list, name: str) -> None:
    for i, (ours, ref) in enumerate(zip(batched, alone)):
        assert ours.tokens == ref.tokens, f"{name}, job {i}: tokens differ"
        assert ours.finish_reason == ref.finish_reason and ours.prompt_tokens == ref.prompt_tokens
        assert len(ours.step_times_s) == len(ref.step_times_s) == len(ref.tokens) - 1
        for key in STATS:
            assert (key in ours.stats) == (key in ref.stats), f"{name}, job {i}: {key} present on one side"
            if key in ref.stats:
                assert ours.stats[key] == pytest.approx(ref.stats[key], rel=1e-6, abs=1e-9), f"{name}, job {i}: {key}"


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_batched_equals_batch_one(tiny_random, name: str) -> None:
    model, _ = tiny_random
    jobs = _jobs(model.config.vocab_size)
    engine = Engine(model, make_case(name), page_size=8, prefill_chunk=32)
    assert_same(_batched(engine, jobs, 3), _alone(engine, jobs), name)


@pytest.mark.parametrize("batch", [2, 8])
def test_batched_sampling_draws_from_each_sequence_seed(tiny_random, batch: int) -> None:
    model, _ = tiny_random
    jobs = _jobs(model.config.vocab_size, n=4, seed=1, sampled=True)
    engine = Engine(model, make_case("retro-quest-w3-cached"), page_size=8, prefill_chunk=32)
    assert_same(_batched(engine, jobs, batch), _alone(engine, jobs), f"sampled, batch {batch}")


def test_batched_stop_rules_and_eos(tiny_random) -> None:
    """EOS and stop strings end one row while the others go on."""
    model, _ = tiny_random
    jobs = [Job(j.prompt_ids, 14) for j in _jobs(model.config.vocab_size, n=4, seed=2)]
    engine = Engine(model, make_case("retro-quest-w2"), page_size=8, prefill_chunk=32)
    alone = _alone(engine, jobs)
    eos = [alone[0].tokens[4]]  # job 0 ends at its 5th token; the others wherever that token comes up
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    stop = [f"{alone[1].tokens[2]} {alone[1].tokens[3]}"]
    kw = {"eos_token_ids": eos, "stop_strings": stop, "decode": decode}
    batched, alone = _batched(engine, jobs, 3, **kw), _alone(engine, jobs, **kw)
    assert alone[0].finish_reason == "eos" and alone[1].finish_reason in ("stop", "eos")
    assert_same(batched, alone, "stop rules")


@pytest.mark.parametrize("name", ["quest-kv_head", "retro-quest-w2"])
def test_batched_equals_batch_one_smollm2(smollm2, name: str) -> None:
    """The real GQA model at batch 3 and 8 (more rows than jobs: idle rows replay their last step)."""
    model, _ = smollm2
    jobs = _jobs(model.config.vocab_size, n=6, seed=3)
    engine = Engine(model, make_case(name), page_size=16, prefill_chunk=64)
    alone = _alone(engine, jobs)
    for batch in (3, 8):
        assert_same(_batched(engine, jobs, batch), alone, f"{name}, batch {batch}")


def test_batched_on_the_triton_backend(tiny_random) -> None:
    """The batched step through the Triton kernels (the interpreter on CPU) equals torch at batch 1."""
    from retrobench.kernels._triton import triton_usable

    if not triton_usable(torch.empty(0)):
        pytest.fail("the triton backend cannot run here: set TRITON_INTERPRET=1 before Python starts (make test does)")
    model, _ = tiny_random
    jobs = _jobs(model.config.vocab_size, n=3, seed=4)
    ref = _alone(Engine(model, make_case("retro-quest-w2"), page_size=8, prefill_chunk=32), jobs)
    ours = _batched(Engine(model, make_case("retro-quest-w2"), page_size=8, prefill_chunk=32, backend="triton"), jobs, 2)
    assert_same(ours, ref, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_batched_cuda_graphs_equal_batch_one_gpu(tiny_random, name: str) -> None:
    """On the GPU: the batched steps replayed from one CUDA graph equal eager batch-1 runs
    (fp32, TF32 off, so both sides round alike)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = copy.deepcopy(tiny_random[0]).to("cuda")
    jobs = _jobs(model.config.vocab_size, n=5, seed=5)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = _alone(Engine(model, make_case(name), page_size=8, prefill_chunk=32, backend="triton", cuda_graphs=False), jobs)
        engine = Engine(model, make_case(name), page_size=8, prefill_chunk=32, backend="triton")
        assert engine.graphs_enabled
        ours = _batched(engine, jobs, 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert_same(ours, ref, name)


@pytest.mark.parametrize("name", ["retro-quest-w2", "infllm-layer"])
def test_requests_are_freed_without_the_garbage_collector(tiny_random, name: str) -> None:
    """A request holds no reference cycle: its cache and state go as soon as it is dropped (a batched
    run starts every sequence on its own request; on a GPU a lingering one holds a whole cache)."""
    import gc
    import weakref

    model, _ = tiny_random
    engine = Engine(model, make_case(name), page_size=8, prefill_chunk=32)
    job = _jobs(model.config.vocab_size, n=1)[0]
    gc.collect()
    gc.disable()
    try:
        request = engine.new_request(len(job.prompt_ids) + 4)
        from retrobench.engine.batch import Stream, start

        start(engine, request, Stream(len(job.prompt_ids), 4, job.sampling, engine.device), job.prompt_ids, until=4)
        assert request.buffers is not None  # decode steps ran
        gone = weakref.ref(request.cache)
        del request
        assert gone() is None, "the request's cache outlived it (a reference cycle)"
    finally:
        gc.enable()
