"""The shared decoding engine: dense chunked prefill, then a decode loop that calls the method.

One :class:`Engine` wraps a transformers causal LM and a method. For every request it allocates
a fresh paged KV cache and fresh method state (so sample A then sample B equals B alone), runs
the prompt through dense chunked prefill, then decodes one token per step. A method with a
retrospective window (RetroAttention) makes each decode step a multi-token forward: the current
token plus up to w-1 earlier generated tokens, whose K/V are overwritten in every layer; only the
current token's logits are computed and sampled.

Teacher forcing feeds given tokens instead of sampled ones (perplexity over position, fidelity).
Sampling is greedy by default, or seeded temperature / top-p sampling.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from retrobench.engine.cache import PagedKVCache
from retrobench.engine.fast import FastContext, FastDecoder, GraphRunner, StepPlan, check_fast_method
from retrobench.engine.hook import FAST_IMPLEMENTATION, ForwardContext, register
from retrobench.methods.base import ConfigError, Method, ModelSpec, StepInfo

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Sampling:
    """Decoding rule: ``temperature == 0`` is greedy; otherwise seeded temperature / top-p sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"engine.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"engine.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """The result of one request.

    tokens: generated (or teacher-forced) token ids, EOS included when it ended generation.
    logits: ``[N, V]`` fp32 logits that predicted each of the N tokens (only with ``keep_logits``).
    stats: means over decode steps (attended_kv, resident_kv, pages_selected, exposure, method
        extras, and with ``probe_every`` mass_recall / attn_out_rel_err) plus kv_bytes and peak memory.
    probes: with ``probe_every``, per probed step the per-layer mass recall and output error.
    """

    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    step_times_s: list[float]
    stats: dict[str, float]
    logits: torch.Tensor | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Request:
    """Per-request state: the cache and the method's state. Never shared between requests."""

    cache: PagedKVCache
    state: Any
    step_stats: list[dict[str, float]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)  # per probed step: per-layer fidelity
    fast: FastDecoder | None = None  # backend=triton: static decode buffers (after prefill)
    graphs: dict[int, GraphRunner] = field(default_factory=dict)  # backend=triton on CUDA: per S


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token from ``logits [V]``."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Runs a transformers causal LM with a retrobench method over an engine-owned paged KV cache.

    Parameters
    ----------
    model: a transformers causal LM with RoPE attention (Llama, Mistral, Qwen2...).
    method: a :class:`retrobench.methods.base.Method`.
    page_size: P, a power of two.
    prefill_chunk: prompt tokens per dense prefill forward.
    backend: ``torch`` (the reference path) or ``triton`` (:mod:`retrobench.engine.fast`: Triton
        kernels, static shapes, decode forwards captured in CUDA graphs on a GPU; methods full,
        quest and retro over quest; prefill stays on the reference path; per-step attention
        accounting and probes are reference-only).
    probe_every: every k-th decode step, compare each sparse layer's attention for the current
        query with dense attention (mass recall, output error; costs a dense read); 0 = never.
    cuda_graphs: with ``backend=triton`` on CUDA, replay decode steps from captured graphs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: Method,
        page_size: int = 16,
        prefill_chunk: int = 512,
        backend: str = "torch",
        probe_every: int = 0,
        cuda_graphs: bool = True,
    ) -> None:
        if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
            raise ConfigError(f"engine.page_size must be a power of two (1, 2, 4, ..., 16, ...), got {page_size!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"engine.backend={backend} is not available; allowed: {', '.join(BACKENDS)}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ConfigError(f"engine.prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.method = method
        self.page_size = page_size
        self.prefill_chunk = prefill_chunk
        self.backend = backend
        self.probe_every = probe_every
        self.cuda_graphs = cuda_graphs
        if backend == "triton":
            check_fast_method(method)
            if probe_every:
                raise ConfigError("attention probes (task.probe_every) need engine.backend=torch; allowed with engine.backend=triton: tasks without probes")
        self._impl = register()
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.spec = ModelSpec(
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            page_size=page_size,
        )
        self.max_context = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.scaling = head_dim**-0.5

    # ---- low level ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _our_attention(self, impl: str | None = None) -> Iterator[None]:
        """Route the model's attention to retrobench for the duration of one forward."""
        previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = impl or self._impl
        try:
            yield
        finally:
            self.model.config._attn_implementation = previous

    def new_request(self, max_tokens: int, batch_size: int = 1) -> Request:
        if max_tokens > self.max_context:
            raise ConfigError(
                f"prompt + max_new_tokens = {max_tokens} tokens exceeds the model's context of {self.max_context}"
            )
        cache = PagedKVCache(
            self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.page_size,
            max_tokens, batch_size, self.dtype, self.device,
        )  # fmt: skip
        return Request(cache=cache, state=self.method.new_state(self.spec, batch_size, self.device))

    @torch.inference_mode()
    def forward(
        self,
        request: Request,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        phase: str,
        step: int,
        last_chunk: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids [B, S]`` at ``positions [B, S]``; returns the last token's logits ``[B, V]``."""
        if phase == "decode" and self.backend == "triton":
            return self._fast_forward(request, input_ids, positions, step)
        info = StepInfo(phase=phase, positions=positions, step=step, scaling=self.scaling, last_chunk=last_chunk)
        request.cache.reserve(positions)
        probe = phase == "decode" and self.probe_every > 0 and step % self.probe_every == 0
        ctx = ForwardContext(cache=request.cache, method=self.method, state=request.state, info=info, probe=probe)
        with self._our_attention():
            out = self.model(
                input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1, rb=ctx
            )
        if phase == "decode":
            request.step_stats.append(self._step_stats(request, ctx))
        return out.logits[:, -1].float()

    def _fast_forward(self, request: Request, input_ids: torch.Tensor, positions: torch.Tensor, step: int) -> torch.Tensor:
        """A decode step of the triton backend (eager, or a CUDA-graph replay per S)."""
        if request.fast is None:
            request.fast = FastDecoder(self.method, self.spec, request.cache, self.scaling)
        dec = request.fast
        dec.load_plan(StepPlan(positions.cpu(), step))
        S = positions.shape[1]
        ctx = FastContext(dec)

        def run(ids: torch.Tensor) -> torch.Tensor:
            dec.begin_step()
            with self._our_attention(FAST_IMPLEMENTATION):
                out = self.model(input_ids=ids, position_ids=dec.pos[:, :S], use_cache=False, logits_to_keep=1, rb=ctx)
            return out.logits[:, -1].float()

        if self.device.type == "cuda" and self.cuda_graphs:
            if S not in request.graphs:
                request.graphs[S] = GraphRunner(run, dec, input_ids)
            logits = request.graphs[S].run(input_ids)
        else:
            logits = run(input_ids)
        request.step_stats.append({"context": float(positions[:, -1].float().mean() + 1)})
        return logits

    def _step_stats(self, request: Request, ctx: ForwardContext) -> dict[str, float]:
        stats = dict(self.method.end_step(ctx.info, request.cache, request.state))
        if not self.method.reports_exposure:  # every query sees exactly its own selection
            stats["exposure"] = 1.0
        stats["context"] = float(ctx.info.positions[:, -1].float().mean() + 1)
        if ctx.attended:  # the current (last) query of each sequence, over sparse layers
            current = torch.stack([a[:, -1] for a in ctx.attended])
            stats["attended_kv"] = float(current.mean())
            stats["attended_kv_max"] = float(current.max())
        if ctx.pages:
            stats["pages_selected"] = float(torch.stack([p[:, -1] for p in ctx.pages]).mean())
        stats["resident_kv"] = float(self.method.resident_tokens(request.cache, request.state).float().mean())
        if ctx.recall:
            stats["mass_recall"] = float(torch.stack(list(ctx.recall.values())).mean())
            stats["attn_out_rel_err"] = float(torch.stack(list(ctx.out_error.values())).mean())
            request.probes.append({"step": ctx.info.step, "recall": {k: float(v.mean()) for k, v in ctx.recall.items()},
                                   "out_error": {k: float(v.mean()) for k, v in ctx.out_error.items()}})  # fmt: skip
        return stats

    def prefill(self, request: Request, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Dense chunked prefill of ``prompt_ids [B, L]``; returns the last prompt token's logits."""
        L = prompt_ids.shape[1]
        logits = None
        for start in range(0, L, self.prefill_chunk):
            end = min(L, start + self.prefill_chunk)
            pos = torch.arange(start, end, device=self.device).expand(prompt_ids.shape[0], -1)
            logits = self.forward(request, prompt_ids[:, start:end], pos, "prefill", -1, last_chunk=end == L)
        assert logits is not None
        return logits

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: Sampling = Sampling(),
        eos_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        teacher_tokens: Sequence[int] | None = None,
        keep_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1).

        With ``teacher_tokens`` the engine feeds those tokens instead of sampling (and never
        stops early); ``keep_logits`` returns the logits that predicted every token.
        """
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: the engine needs at least one prompt token")
        if stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function")
        if teacher_tokens is not None:
            max_new_tokens = len(teacher_tokens)
        window = self.method.reprocess_window
        request = self.new_request(len(prompt_ids) + max_new_tokens)
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        L0 = ids.shape[1]
        kept: list[torch.Tensor] = []
        tokens: list[int] = []
        eos = set(int(e) for e in eos_token_ids)
        tail = max((len(s) for s in stop_strings), default=0) + 16

        _sync(self.device)
        t0 = time.perf_counter()
        logits = self.prefill(request, ids)
        step_times: list[float] = []
        finish = "length"
        ttft = 0.0
        for n in range(max_new_tokens):
            if n > 0:  # decode step n-1 feeds token n-1 (plus the retrospective window)
                t_step = time.perf_counter()
                lo = max(0, n - window)
                feed = torch.tensor([tokens[lo:n]], dtype=torch.long, device=self.device)
                pos = torch.arange(L0 + lo, L0 + n, device=self.device).unsqueeze(0)
                logits = self.forward(request, feed, pos, "decode", n - 1)
            if keep_logits:
                kept.append(logits[0].clone())
            token = int(teacher_tokens[n]) if teacher_tokens is not None else sample_next(logits[0], sampling, generator)
            tokens.append(token)
            _sync(self.device)
            if n == 0:
                ttft = time.perf_counter() - t0
            else:
                step_times.append(time.perf_counter() - t_step)
            if on_token is not None:
                on_token(len(tokens))
            if teacher_tokens is not None:
                finish = "teacher"
                continue
            if token in eos:
                finish = "eos"
                break
            if stop_strings and any(s in decode(tokens[-tail:]) for s in stop_strings):
                finish = "stop"
                break
        return Generation(
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=L0,
            ttft_s=ttft,
            step_times_s=step_times,
            stats=self._summarize(request),
            logits=torch.stack(kept) if keep_logits else None,
            probes=request.probes,
        )

    def _summarize(self, request: Request) -> dict[str, float]:
        keys = sorted({k for s in request.step_stats for k in s})
        out = {
            k: sum(s[k] for s in request.step_stats if k in s) / max(1, sum(1 for s in request.step_stats if k in s))
            for k in keys
        }
        resident = self.method.resident_tokens(request.cache, request.state).float().mean()
        out["kv_bytes"] = float(resident) * request.cache.bytes_per_token()
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = float(torch.cuda.max_memory_allocated(self.device))
        else:  # process peak RSS (Linux reports KiB)
            out["peak_memory_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return out
