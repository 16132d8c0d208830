"""One sequence's decoding rules, and continuous batching of many sequences over one request.

:class:`Stream` holds what one generated sequence needs between forwards: its tokens, sampler,
stop rules, timing and the tokens to feed next (the current token plus RetroAttention's window).
``Engine.generate`` runs one stream at batch 1; :func:`generate_batch` runs B streams at once.

Continuous batching (:func:`generate_batch`): one request of B rows decodes all active sequences
in one forward per step. A sequence enters a row after a *solo* start on its own batch-1 request
with the same capacity: dense prefill, its first token, and the decode steps of its first w-1
tokens (while its window is still filling, a step feeds fewer tokens than the batch's W). Its
cache pages, method state and accounting are then copied into the free row, so from there on
every row feeds exactly W tokens and the batched forward is one static shape (one CUDA graph).
A row whose sequence finished is refilled with the next waiting one; with none left, it replays
its last step (its outputs are discarded) until every row is done. Rows never interact: every
kernel op and every method's state is per sequence, so greedy outputs equal batch 1 token for
token wherever the model's own matmuls are batch-invariant (fp32 on CPU in the tests), and a
sampled sequence draws from its own seeded generator, whoever shares its batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from retrobench.engine.sampling import Sampling, sample_next

if TYPE_CHECKING:
    from retrobench.engine.engine import Engine, Generation, Request


@dataclass(frozen=True)
class Job:
    """One sequence to generate in a batch: its prompt, its token limit and its sampling rule."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()


class Stream:
    """The host side of one sequence being generated (tokens, stop rules, timing).

    ``teacher_tokens``: feed these instead of sampling (never stops early). ``keep_logits``: keep
    the logits that predicted every token.
    """

    def __init__(
        self,
        prompt_len: int,
        max_new_tokens: int,
        sampling: Sampling,
        device: torch.device,
        eos_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        teacher_tokens: Sequence[int] | None = None,
        keep_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> None:
        self.prompt_len = prompt_len
        self.max_new_tokens = len(teacher_tokens) if teacher_tokens is not None else max_new_tokens
        self.sampling = sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.eos = {int(e) for e in eos_token_ids}
        self.stop_strings = tuple(stop_strings)
        self.decode = decode
        self.teacher = teacher_tokens
        self.keep_logits = keep_logits
        self.on_token = on_token
        self.tail = max((len(s) for s in self.stop_strings), default=0) + 16
        self.tokens: list[int] = []
        self.kept: list[torch.Tensor] = []
        self.step_times: list[float] = []
        self.ttft = 0.0
        self.finish = "length"
        self.t0 = self.t_step = 0.0

    @property
    def greedy(self) -> bool:
        return self.teacher is None and self.sampling.temperature == 0.0

    def feed(self, window: int) -> tuple[list[int], list[int], int]:
        """The next decode step's tokens, their positions and the step number: step n-1 feeds token
        n-1 and up to ``window - 1`` tokens before it."""
        n = len(self.tokens)
        lo = max(0, n - window)
        return self.tokens[lo:n], list(range(self.prompt_len + lo, self.prompt_len + n)), n - 1

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from its logits ``[V]`` (the teacher's, or sampled by the rule)."""
        if self.teacher is not None:
            return int(self.teacher[len(self.tokens)])
        return sample_next(logits, self.sampling, self.generator)

    def accept(self, token: int, logits: torch.Tensor | None, now: float) -> bool:
        """Append ``token`` (timed at ``now``, after the device synchronised); True when the sequence is done."""
        if self.keep_logits and logits is not None:
            self.kept.append(logits.clone())
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.ttft = now - self.t0
        else:
            self.step_times.append(now - self.t_step)
        if self.on_token is not None:
            self.on_token(len(self.tokens))
        if self.teacher is not None:
            self.finish = "teacher"
        elif token in self.eos:
            self.finish = "eos"
            return True
        elif self.stop_strings and any(s in self.decode(self.tokens[-self.tail :]) for s in self.stop_strings):
            self.finish = "stop"
            return True
        return len(self.tokens) >= self.max_new_tokens


def start(engine: Engine, request: Request, stream: Stream, prompt_ids: Sequence[int], until: int) -> bool:
    """Prefill ``prompt_ids`` into ``request`` (batch 1) and decode until ``stream`` holds ``until``
    tokens or is done; True when done. The clock of the first token starts here."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=engine.device)
    engine.sync()
    stream.t0 = time.perf_counter()
    logits = engine.prefill(request, ids)
    if stream.max_new_tokens <= 0:
        return True
    done = stream.accept(stream.pick(logits[0]), logits[0], engine.synced_clock())
    while not done and len(stream.tokens) < until:
        feed, pos, step = stream.feed(engine.method.reprocess_window)
        stream.t_step = time.perf_counter()
        logits = engine.forward(request, torch.tensor([feed], device=engine.device), torch.tensor([pos]), "decode", step)
        done = stream.accept(stream.pick(logits[0]), logits[0], engine.synced_clock())
    return done


@torch.inference_mode()
def generate_batch(
    engine: Engine,
    jobs: Sequence[Job],
    batch_size: int,
    on_done: Callable[[int, Generation], None],
    *,
    eos_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
) -> None:
    """Generate every job, ``batch_size`` rows at a time, calling ``on_done(index, generation)`` as
    each sequence finishes (in finishing order). See the module docstring for the schedule."""
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    for job in jobs:
        if len(job.prompt_ids) == 0:
            raise ValueError("a job's prompt_ids is empty: the engine needs at least one prompt token")
    W = engine.method.reprocess_window
    capacity = max(len(j.prompt_ids) + j.max_new_tokens for j in jobs)
    B = min(batch_size, len(jobs))
    if B <= 1 or engine.probe_every:
        for i, job in enumerate(jobs):
            on_done(i, engine.generate(job.prompt_ids, job.max_new_tokens, sampling=job.sampling,
                                       eos_token_ids=eos_token_ids, stop_strings=stop_strings, decode=decode))  # fmt: skip
        return
    request = engine.new_request(capacity, B)
    waiting = deque(range(len(jobs)))
    rows: list[tuple[int, Stream] | None] = [None] * B
    last: list[tuple[list[int], list[int], int] | None] = [None] * B  # each row's last step, replayed when idle

    def fill(b: int) -> None:
        while waiting:
            i = waiting.popleft()
            job = jobs[i]
            stream = Stream(len(job.prompt_ids), job.max_new_tokens, job.sampling, engine.device, eos_token_ids,
                            stop_strings, decode)  # fmt: skip
            solo = engine.new_request(capacity, 1, eager=True)
            if start(engine, solo, stream, job.prompt_ids, until=W):
                on_done(i, engine.finish(solo, stream, 0))
                continue
            engine.copy_row(request, b, solo, 0)
            rows[b] = (i, stream)
            return
        rows[b] = None

    for b in range(B):
        fill(b)
    while any(rows):
        for b in range(B):  # a row that never held a decoding sequence mirrors a live one
            if rows[b] is None and last[b] is None:
                a = next(a for a in range(B) if rows[a] is not None)
                engine.copy_row(request, b, request, a)
                last[b] = rows[a][1].feed(W)
        for b, row in enumerate(rows):
            if row is not None:
                last[b] = row[1].feed(W)
        steps = [s for _, _, s in last]  # type: ignore[misc]
        ids = torch.tensor([f for f, _, _ in last], device=engine.device)  # type: ignore[misc]
        pos = torch.tensor([p for _, p, _ in last])  # type: ignore[misc]
        t_step = time.perf_counter()
        logits = engine.forward(request, ids, pos, "decode", steps)
        greedy = logits.argmax(dim=-1).tolist()  # one host read for every greedy row
        now = engine.synced_clock()
        for b, row in enumerate(rows):
            if row is None:
                continue
            i, stream = row
            stream.t_step = t_step
            token = greedy[b] if stream.greedy else stream.pick(logits[b])
            if stream.accept(token, None, now):
                on_done(i, engine.finish(request, stream, b))
                fill(b)





def auto_batch_size(engine: Engine, capacity: int, jobs: int, limit: int = 256) -> int:
    """How many sequences of ``capacity`` tokens to decode at once: 1 on CPU (CPU matmuls are not
    batch-invariant, so batch 1 keeps CPU results exactly reproducible); on a CUDA device, as many as the memory left after the weights holds, measured
    by allocating one sequence's cache and method state, keeping 10 % + 2 GiB for activations and
    one more sequence for the batch-1 start of the next one. At most ``jobs`` and ``limit``."""
    if engine.device.type != "cuda" or jobs < 2:
        return 1
    dev = engine.device
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    probe = engine.new_request(capacity, 1, eager=True)
    per_sequence = max(1, torch.cuda.memory_allocated(dev) - before)
    del probe
    free, _ = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # held by torch's allocator
    usable = 0.9 * free - 2 * 2**30
    return max(1, min(jobs, limit, int(usable // per_sequence) - 1))
__all__ = ["Job", "Stream", "auto_batch_size", "generate_batch", "start"]
