"""The shared decoding engine: dense chunked prefill, then a decode loop that calls the method.

One :class:`Engine` wraps a transformers causal LM and a method. For every request it allocates
a fresh paged KV cache and fresh method state (so sample A then sample B equals B alone), runs
the prompt through dense chunked prefill, then decodes one token per step. A method with a
retrospective window (RetroAttention) makes each decode step a multi-token forward: the current
token plus up to w-1 earlier generated tokens, whose K/V are overwritten in every layer; only the
current token's logits are computed and sampled.

Both backends run the same method code; ``engine.backend`` only picks the kernel ops
(``retrobench.kernels.ops``): ``torch`` their PyTorch references, ``triton`` the Triton kernels,
whose decode steps are captured in CUDA graphs on a GPU (``retrobench/engine/graphs.py``).
The engine names no method: everything method-specific happens behind the method contract
(``methods/base.py``). Per-step accounting stays on the device and is read once per request.

Teacher forcing feeds given tokens instead of sampled ones (perplexity over position, fidelity).
Sampling is greedy by default, or seeded temperature / top-p sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from retrobench.engine.batch import Stream, generate_batch, start
from retrobench.engine.cache import PagedKVCache
from retrobench.engine.graphs import CaptureGuard, GraphRunner, StepBuffers, make_forward
from retrobench.engine.hook import Call, attend, register
from retrobench.engine.layers import FusedLayers, unsupported_reason
from retrobench.kernels.ops import BACKENDS, TritonUnavailable, get_ops, resolve_backend, resolve_prefill_chunk
from retrobench.engine.sampling import Sampling
from retrobench.methods.base import INT32_MAX, Accounting, ConfigError, Forward, Method, ModelSpec, state_tensors


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
    """Per-request state: the cache, the method's state and the accounting. Never shared between requests.

    ``history`` (``record_steps=True``): after every decode step, copies of the accounting sums and
    counts on the device, for per-step checks (:meth:`Engine.step_stats`).
    """

    cache: PagedKVCache
    state: Any
    acct: Accounting
    probes: list[dict[str, Any]] = field(default_factory=list)  # per probed step: per-layer fidelity
    history: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    buffers: StepBuffers | None = None  # static decode inputs (created at the first decode step)
    graphs: dict[int, GraphRunner] = field(default_factory=dict)  # captured decode steps, per S
    eager: bool = False  # never capture (a batch-1 start of a sequence joining a batch: a few steps)


def _attend(call: Call, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attend(layer, q, k, v, call)


def check_settings(page_size: Any, prefill_chunk: Any, compile: Any = "auto") -> None:
    """The engine's own settings, checked once here: by :class:`Engine` and, before any model
    loads, by the run layer (:func:`retrobench.runner.validation.check_engine`)."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1 or page_size & (page_size - 1):
        raise ConfigError(f"engine.page_size must be a power of two (1, 2, 4, ..., 16, ...), got {page_size!r}")
    if prefill_chunk != "auto" and (not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool)
                                    or prefill_chunk < 1):  # fmt: skip
        raise ConfigError(f"engine.prefill_chunk must be an integer >= 1 or auto, got {prefill_chunk!r}")
    if compile not in ("auto", True, False) or isinstance(compile, int) and not isinstance(compile, bool):
        raise ConfigError(f"engine.compile must be auto, true or false, got {compile!r}")


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
    prefill_chunk: prompt tokens per dense prefill forward, or ``auto`` (512 on CPU, 32768 on a CUDA
        device: :data:`retrobench.kernels.ops.PREFILL_CHUNK`).
    backend: ``torch`` (the ops' PyTorch references), ``triton`` (the Triton kernels: a CUDA GPU,
        or CPU under ``TRITON_INTERPRET=1``) or ``auto`` (triton on a CUDA model, else torch).
        Every method runs on both.
    probe_every: every k-th decode step, compare each sparse layer's attention for the current
        query with dense attention (mass recall, output error; costs a dense read); 0 = never.
        Probed steps run eagerly.
    cuda_graphs: with ``backend=triton`` on CUDA, replay decode steps from captured graphs.
    capture_check: run eager decode steps under :class:`~retrobench.engine.graphs.CaptureGuard`,
        which raises on any host synchronisation or host-built tensor (what breaks a CUDA-graph
        capture), kernel launches excepted: the CPU check of the graph-captured code.
    compile: run decode steps through the fused layers (``retrobench/engine/layers.py``: Q/K/V and
        gate/up as one projection each, norms, RoPE and the MLP's elementwise work fused by
        ``torch.compile``; the attention is unchanged). ``auto``: on with ``backend=triton`` and CUDA
        graphs on a CUDA device when the architecture is supported (Llama, Mistral, Qwen2), else off.
        ``True`` on an unsupported architecture raises :class:`ConfigError`.
    fused_layers: run every forward through the fused layers, uncompiled unless ``compile`` (tests
        compare them with transformers' modules). ``None``: on with ``compile``, and on CPU for a
        supported architecture (uncompiled: one Q/K/V and one gate/up projection a layer, and about
        a third less Python and dispatch per layer than transformers' modules); else off.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: Method,
        page_size: int = 16,
        prefill_chunk: int | str = "auto",
        backend: str = "torch",
        probe_every: int = 0,
        cuda_graphs: bool = True,
        capture_check: bool = False,
        compile: bool | str = "auto",
        fused_layers: bool | None = None,
    ) -> None:
        check_settings(page_size, prefill_chunk, compile)
        param = next(model.parameters())
        backend = resolve_backend(backend, param.device)
        prefill_chunk = resolve_prefill_chunk(prefill_chunk, param.device)
        if backend not in BACKENDS:
            raise ConfigError(f"engine.backend={backend} is not available; allowed: auto, {', '.join(BACKENDS)}")
        self.model = model
        self.method = method
        self.page_size = page_size
        self.prefill_chunk = prefill_chunk
        self.backend = backend
        self.probe_every = probe_every
        self.cuda_graphs = cuda_graphs
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        try:
            self.ops = get_ops(backend, self.device)
        except TritonUnavailable as exc:
            raise ConfigError(
                f"engine.backend=triton cannot run on device={self.device}: {exc}; allowed here: torch "
                "(or a CUDA device, or TRITON_INTERPRET=1 set before Python starts)"
            ) from None
        self.guard = CaptureGuard() if capture_check else None
        if self.guard is not None:  # kernel launches (and references that may sync) run unchecked
            opaque = {n: self.guard.opaque(f) for n, f in self.ops.impl().items() if n in self.ops.kernels}
            self.ops = dataclasses.replace(self.ops, **opaque)
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
        self.scaling = head_dim**-0.5
        self.compile = self._resolve_compile(compile)
        if fused_layers is None:  # compiled on a GPU; uncompiled on CPU, where they cut per-layer overhead
            fused_layers = self.compile or (self.device.type == "cpu" and unsupported_reason(model) is None)
        self.layers = FusedLayers(model) if fused_layers else None

    def _resolve_compile(self, value: bool | str) -> bool:
        """``engine.compile`` as a bool: ``auto`` is on where the fused layers and CUDA graphs both run."""
        reason = unsupported_reason(self.model)
        if value == "auto":
            return reason is None and self.graphs_enabled
        if value and reason is not None:
            raise ConfigError(f"engine.compile=true cannot run this model: {reason}; allowed here: false, auto")
        return bool(value)

    @property
    def graphs_enabled(self) -> bool:
        return self.cuda_graphs and self.ops.capturable and self.device.type == "cuda"

    # ---- low level ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _our_attention(self) -> Iterator[None]:
        """Route the model's attention to retrobench for the duration of one forward."""
        previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = self._impl
        try:
            yield
        finally:
            self.model.config._attn_implementation = previous

    def new_request(
        self, max_tokens: int, batch_size: int = 1, record_steps: bool = False, eager: bool = False
    ) -> Request:
        """Fresh cache, method state and accounting for ``batch_size`` sequences of up to ``max_tokens``
        (``eager``: decode steps are never captured in CUDA graphs)."""
        if max_tokens > self.max_context:
            raise ConfigError(
                f"prompt + max_new_tokens = {max_tokens} tokens exceeds the model's context of {self.max_context}"
            )
        cache = PagedKVCache(
            self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.page_size,
            max_tokens, batch_size, self.dtype, self.device, page_meta=self.method.needs_page_meta,
        )  # fmt: skip
        return Request(
            cache=cache,
            state=self.method.new_state(self.spec, batch_size, cache.capacity, self.device),
            acct=Accounting(self.spec.num_layers, batch_size, self.device),
            history=[] if record_steps else None,
            eager=eager,
        )

    def _forward_ctx(self, request: Request, phase: str, **tensors: Any) -> Forward:
        return make_forward(phase, self.ops, request.cache, request.state, self.spec, self.scaling, request.acct,
                            **tensors)  # fmt: skip

    def _run(self, ids: torch.Tensor, call: Call) -> torch.Tensor:
        call.fwd.memo.clear()
        if self.layers is not None:
            compiled = self.compile and call.fwd.phase == "decode"
            return self.layers.forward(ids, call.fwd.pos, functools.partial(_attend, call), compiled)
        with self._our_attention():
            out = self.model(input_ids=ids, position_ids=call.fwd.pos, use_cache=False, logits_to_keep=1, rb=call)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def forward(
        self,
        request: Request,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        phase: str,
        step: int | Sequence[int],
        last_chunk: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids [B, S]`` at ``positions [B, S]`` (ascending per row); returns the last
        token's logits ``[B, V]``. ``step``: the decode step of the current token (per sequence or
        one for all)."""
        positions = positions.detach().to("cpu", torch.int64)
        B, S = positions.shape
        ends = (positions[:, -1] + 1).tolist()
        steps = [int(step)] * B if isinstance(step, int) else [int(s) for s in step]
        plan = self.method.plan(request.state, ends, steps, phase, last_chunk)
        if phase == "prefill":
            return self._prefill_forward(request, input_ids, positions, plan, last_chunk)
        if request.buffers is None:  # no reference back to the request: it is freed as soon as it is dropped
            make = functools.partial(make_forward, "decode", self.ops, request.cache, request.state, self.spec,
                                     self.scaling, request.acct)  # fmt: skip
            request.buffers = StepBuffers(B, self.method.reprocess_window, sorted(plan), make, self.device)
        request.buffers.load(positions, steps, self.page_size, plan)
        fwd = request.buffers.forward(S)
        self.method.prepare(fwd)
        probe = self.probe_every > 0 and steps[0] % self.probe_every == 0
        fwd.probing = probe
        ids = input_ids.to(self.device)
        if probe:
            call = Call(self.method, fwd, probes={})
            logits = self._run(ids, call)
            self._keep_probes(request, steps[0], call.probes)
        elif self.graphs_enabled and not request.eager:
            if S not in request.graphs:
                mutable = state_tensors(request.state) + request.acct.tensors()
                request.graphs[S] = GraphRunner(lambda x: self._run(x, Call(self.method, fwd)), mutable, ids)
            logits = request.graphs[S].run(ids)
        elif self.guard is not None:
            with self.guard:
                logits = self._run(ids, Call(self.method, fwd))
        else:
            logits = self._run(ids, Call(self.method, fwd))
        if request.history is not None:
            request.history.append((request.acct.sums.clone(), request.acct.counts.clone()))
        return logits

    def _prefill_forward(
        self, request: Request, input_ids: torch.Tensor, positions: torch.Tensor, plan: dict[str, list[int]],
        last_chunk: bool,
    ) -> torch.Tensor:  # fmt: skip
        dev = self.device
        B, S = positions.shape
        ends = positions[:, -1] + 1
        fwd = self._forward_ctx(
            request, "prefill", pos=positions.to(dev), ends=ends.to(dev),
            n_pages=((ends + self.page_size - 1) // self.page_size).to(dev),
            step=torch.full((B,), -1, dtype=torch.int64, device=dev),
            q_step=torch.full((B, S), INT32_MAX, dtype=torch.int64, device=dev),
            plan={k: torch.tensor(v, dtype=torch.int64, device=dev) for k, v in plan.items()},
            last_chunk=last_chunk,
        )  # fmt: skip
        return self._run(input_ids.to(dev), Call(self.method, fwd))

    def _keep_probes(self, request: Request, step: int, probes: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per probed step, per sparse layer: mass recall and output error of sequence 0."""
        if probes:
            request.probes.append({"step": step, "recall": {k: v[0][0] for k, v in probes.items()},
                                   "out_error": {k: v[1][0] for k, v in probes.items()}})  # fmt: skip

    def step_stats(self, request: Request, b: int = 0) -> list[dict[str, float]]:
        """Per decode step (``record_steps=True``), the metrics recorded in that step for sequence ``b``."""
        if request.history is None:
            raise ValueError("per-step stats need new_request(..., record_steps=True)")
        names = Accounting.METRICS
        out, prev_s, prev_c = [], None, None
        for sums, counts in request.history:
            s, c = sums[b].cpu(), counts[b].cpu()
            ds, dc = (s, c) if prev_s is None else (s - prev_s, c - prev_c)
            out.append({n: float(ds[i] / dc[i]) for i, n in enumerate(names) if dc[i] > 0})
            prev_s, prev_c = s, c
        return out

    def prefill(self, request: Request, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Dense chunked prefill of ``prompt_ids [B, L]``; returns the last prompt token's logits."""
        L = prompt_ids.shape[1]
        logits = None
        for lo in range(0, L, self.prefill_chunk):
            end = min(L, lo + self.prefill_chunk)
            pos = torch.arange(lo, end).expand(prompt_ids.shape[0], -1)
            logits = self.forward(request, prompt_ids[:, lo:end], pos, "prefill", -1, last_chunk=end == L)
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
        stream = Stream(len(prompt_ids), max_new_tokens, sampling, self.device, eos_token_ids, stop_strings, decode,
                        teacher_tokens, keep_logits, on_token)  # fmt: skip
        request = self.new_request(len(prompt_ids) + stream.max_new_tokens)
        start(self, request, stream, prompt_ids, until=stream.max_new_tokens)
        return self.finish(request, stream)

    #: ``generate_batch(jobs, batch_size, on_done, *, eos_token_ids, stop_strings, decode)``: every job, up
    #: to ``batch_size`` at once with continuous batching, ``on_done(index, generation)`` as each finishes.
    generate_batch = generate_batch

    def finish(self, request: Request, stream: Stream, b: int = 0) -> Generation:
        """The :class:`Generation` of ``stream``, decoded in row ``b`` of ``request`` (one accounting read)."""
        return Generation(
            tokens=stream.tokens,
            finish_reason=stream.finish,
            prompt_tokens=stream.prompt_len,
            ttft_s=stream.ttft,
            step_times_s=stream.step_times,
            stats=self._summarize(request, b, stream.prompt_len),
            logits=torch.stack(stream.kept) if stream.keep_logits and stream.kept else None,
            probes=self.probe_records(request) if b == 0 else [],
        )

    def copy_row(self, dst: Request, b: int, src: Request, a: int) -> None:
        """Copy sequence ``a`` of ``src`` (cache pages, method state, accounting) into row ``b`` of ``dst``."""
        dst.cache.copy_sequence(b, src.cache, a)
        self.method.copy_row(dst.state, b, src.state, a, self.spec, dst.cache.capacity)
        dst.acct.copy_row(b, src.acct, a)

    def sync(self) -> None:
        """Wait for the device (timing)."""
        _sync(self.device)

    def synced_clock(self) -> float:
        """``time.perf_counter()`` once the device has finished its queued work."""
        _sync(self.device)
        return time.perf_counter()

    @staticmethod
    def probe_records(request: Request) -> list[dict[str, Any]]:
        """The probed steps with per-layer values as floats (one host read at the end)."""
        return [
            {"step": p["step"], "recall": {k: float(v) for k, v in p["recall"].items()},
             "out_error": {k: float(v) for k, v in p["out_error"].items()}}
            for p in request.probes
        ]  # fmt: skip

    def _summarize(self, request: Request, b: int, prompt_tokens: int) -> dict[str, float]:
        """Sequence ``b``'s means over decode steps (one read of the device accounting), plus memory."""
        out = request.acct.means()[b]
        if "context" in out and not getattr(self.method, "reports_exposure", False):
            out["exposure"] = 1.0  # every query sees exactly its own selection
        resident = request.acct.latest("resident_kv")[b] if "context" in out else float(prompt_tokens)
        out["kv_bytes"] = float(resident) * request.cache.bytes_per_token()
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = float(torch.cuda.max_memory_allocated(self.device))
        else:  # process peak RSS (Linux reports KiB)
            out["peak_memory_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return out
