"""How the run layer drives one sample of a task, by the task's ``mode``.

Tasks stay engine-free (``tasks/base.py``): they build samples and score what they are given.
This module is the glue that turns a sample into engine calls and a per-sample result row:

- ``generate`` (default): sample up to ``max_new_tokens`` tokens, score the decoded text.
- ``teacher_forced`` (ppl): prefill ``meta["prompt_ids"]``, teacher-force ``meta["target_ids"]``
  through the method's decode loop, turn the logits into per-token NLL (float64 log-softmax) and
  let the task score it against the full-attention NLL of the same tokens.
- ``fidelity``: generate the full-attention greedy output of the prompt, then teacher-force the
  method along it with attention probes every ``task.probe_every`` steps; the task scores logits
  and probes against the reference.

The full-attention side of ``teacher_forced`` and ``fidelity`` does not depend on the method, so it
is computed once per sample and cached in ``<results_dir>/reference/``
(:class:`retrobench.runner.reference.ReferenceStore`); a ``method=full`` ppl run stores its own NLL as
the reference instead of computing it twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from retrobench.store.metrics import summarize, token_nll
from retrobench.runner.reference import ReferenceStore, engine_identity, token_digest

MODES = ("generate", "teacher_forced", "fidelity")
#: Task settings that never change a full-attention reference (left out of its cache key).
REFERENCE_FREE_SETTINGS = ("num_samples", "bucket_tokens", "probe_every")


def sample_seed(seed: int, sample_id: str) -> int:
    """Sampling seed of one sample: a function of (run seed, sample id), so resumes reproduce it."""
    return int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:8], 16)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt, wrapped in the model's chat template when asked and available."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


@dataclass
class RunContext:
    """What every sample of a run shares: model, tokenizer, the method's engine, the reference store."""

    model: Any
    tokenizer: Any
    engine: Any
    task: Any
    store: ReferenceStore
    model_identity: dict[str, Any]
    eos: list[int] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    _full: Any = None

    def full_engine(self) -> Any:
        """A full-attention engine with the same model and engine settings (built once)."""
        if self._full is None:
            from retrobench.engine import Engine
            from retrobench.methods.full import FullMethod

            e = self.engine
            self._full = Engine(
                self.model,
                FullMethod(),
                page_size=e.page_size,
                prefill_chunk=e.prefill_chunk,
                backend=e.backend,
                compile=e.compile,
            )
        return self._full

    def identity(self, sample_id: str, *token_seqs: Any, **extra: Any) -> dict[str, Any]:
        """The cache identity of a reference for one sample (see :mod:`retrobench.runner.reference`)."""
        settings = {k: v for k, v in self.task.settings().items() if k not in REFERENCE_FREE_SETTINGS}
        settings.get("source_settings", {}).pop("num_samples", None)
        return {
            "model": self.model_identity,
            "engine": engine_identity(self.engine),
            "task": settings,
            "sample": sample_id,
            "tokens": token_digest(*token_seqs),
            **extra,
        }


def run_sample(
    ctx: RunContext, sample: Any, seed: int, on_token: Callable[[int], None] | None
) -> dict[str, Any]:
    """One sample in the task's mode; returns the mode-specific part of its result row."""
    mode = getattr(ctx.task, "mode", "generate")
    if mode == "teacher_forced":
        return teacher_forced(ctx, sample, on_token)
    if mode == "fidelity":
        return fidelity(ctx, sample, on_token)
    if mode == "generate":
        return generate(ctx, sample, seed, on_token)
    raise ValueError(f"task {ctx.task.name} has mode={mode!r}; allowed: {', '.join(MODES)}")


def _timing(gen: Any) -> dict[str, Any]:
    return {
        "ttft_s": gen.ttft_s,
        "tpot_s": {k: v for k, v in summarize(gen.step_times_s).items() if k in ("mean", "p50", "p90")},
        "step_times_s": [round(t, 7) for t in gen.step_times_s],
        "stats": gen.stats,
    }


def generate_job(ctx: RunContext, sample: Any, seed: int) -> Any:
    """The engine job of one ``generate`` sample: its prompt ids, token limit and seeded sampling rule."""
    from retrobench.engine import Job, Sampling

    return Job(
        encode_prompt(ctx.tokenizer, sample.prompt, bool(ctx.task.chat_template)),
        int(ctx.task.max_new_tokens),
        Sampling(temperature=ctx.temperature, top_p=ctx.top_p, seed=sample_seed(seed, sample.id)),
    )


def generate(
    ctx: RunContext, sample: Any, seed: int, on_token: Callable[[int], None] | None
) -> dict[str, Any]:
    """Sample an answer and score its text (``task.score``)."""
    job = generate_job(ctx, sample, seed)
    gen = ctx.engine.generate(
        job.prompt_ids,
        job.max_new_tokens,
        sampling=job.sampling,
        eos_token_ids=ctx.eos,
        stop_strings=tuple(ctx.task.stop),
        decode=ctx.tokenizer.decode,
        on_token=on_token,
    )
    return generate_row(ctx, sample, gen)


def generate_row(ctx: RunContext, sample: Any, gen: Any) -> dict[str, Any]:
    """The mode-specific result row of a generated sample (also for samples decoded in a batch)."""
    text = ctx.tokenizer.decode(gen.tokens, skip_special_tokens=True)
    return {
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": len(gen.tokens),
        "finish_reason": gen.finish_reason,
        "output": text,
        "reference": sample.reference,
        "score": ctx.task.score(sample, text),
        **_timing(gen),
    }


def teacher_forced(ctx: RunContext, sample: Any, on_token: Callable[[int], None] | None) -> dict[str, Any]:
    """Per-token NLL of ``meta["target_ids"]`` after ``meta["prompt_ids"]``, scored with the full ratio."""
    prompt, target = list(sample.meta["prompt_ids"]), list(sample.meta["target_ids"])
    gen = ctx.engine.generate(prompt, 0, teacher_tokens=target, keep_logits=True, on_token=on_token)
    nll = token_nll(gen.logits.cpu(), target)
    gen.logits = None  # free [N, V] early
    identity = ctx.identity(sample.id, prompt, target)
    key = ctx.store.key("ppl", identity)
    t0 = time.perf_counter()

    def entry(values: torch.Tensor) -> dict[str, Any]:
        return {
            "tokens": torch.tensor(target),
            "nll": values.double(),
            "identity": json.dumps(identity, default=str),
        }

    def valid(data: dict[str, Any]) -> bool:
        return "nll" in data and data.get("tokens") is not None and data["tokens"].tolist() == target

    if ctx.engine.method.name == "full":  # this run is the reference: store it unless present
        ref, cached = ctx.store.get_or_compute(key, lambda: entry(nll), valid)
    else:
        ref, cached = ctx.store.get_or_compute(key, lambda: entry(_full_nll(ctx, prompt, target)), valid)
    score = ctx.task.score_nll(sample, nll.tolist(), ref["nll"].tolist())
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": len(target),
        "finish_reason": gen.finish_reason,
        "output": "",
        "reference": sample.reference,
        "score": score,
        "reference_cached": cached,
        "reference_s": time.perf_counter() - t0,
        **_timing(gen),
    }


def _full_nll(ctx: RunContext, prompt: list[int], target: list[int]) -> torch.Tensor:
    gen = ctx.full_engine().generate(prompt, 0, teacher_tokens=target, keep_logits=True)
    return token_nll(gen.logits.cpu(), target)


def fidelity(ctx: RunContext, sample: Any, on_token: Callable[[int], None] | None) -> dict[str, Any]:
    """Teacher-force the method along the (cached) full-attention greedy output; score the agreement."""
    task = ctx.task
    prompt = encode_prompt(ctx.tokenizer, sample.prompt, bool(task.chat_template))
    identity = ctx.identity(
        sample.id, prompt, max_new_tokens=int(task.max_new_tokens), eos=sorted(ctx.eos), stop=list(task.stop)
    )
    key = ctx.store.key("fidelity", identity)
    t0 = time.perf_counter()

    def compute() -> dict[str, Any]:
        gen = ctx.full_engine().generate(
            prompt,
            int(task.max_new_tokens),
            eos_token_ids=ctx.eos,
            stop_strings=tuple(task.stop),
            decode=ctx.tokenizer.decode,
            keep_logits=True,
        )
        return {
            "tokens": torch.tensor(gen.tokens, dtype=torch.long),
            "logits": gen.logits.cpu().to(torch.float16),
            "finish_reason": gen.finish_reason,
            "identity": json.dumps(identity, default=str),
        }

    def valid(data: dict[str, Any]) -> bool:
        tokens, logits = data.get("tokens"), data.get("logits")
        return tokens is not None and logits is not None and logits.shape[0] == tokens.numel() > 0

    ref, cached = ctx.store.get_or_compute(key, compute, valid)
    reference_s = time.perf_counter() - t0
    ref_tokens = ref["tokens"].tolist()
    gen = ctx.engine.generate(prompt, 0, teacher_tokens=ref_tokens, keep_logits=True, on_token=on_token)
    score = task.score_fidelity(sample, ref_tokens, ref["logits"], gen.logits.cpu(), gen.probes)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": len(ref_tokens),
        "finish_reason": gen.finish_reason,
        "output": ctx.tokenizer.decode(ref_tokens, skip_special_tokens=True),
        "reference": sample.reference,
        "score": score,
        "reference_cached": cached,
        "reference_finish_reason": ref.get("finish_reason"),
        "reference_s": reference_s,
        "probes": gen.probes,
        **_timing(gen),
    }


__all__ = [
    "MODES",
    "RunContext",
    "encode_prompt",
    "fidelity",
    "generate",
    "generate_job",
    "generate_row",
    "run_sample",
    "sample_seed",
    "teacher_forced",
]
