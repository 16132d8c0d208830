"""Static decode buffers and CUDA-graph replay of a decode step.

A decode step reads everything that changes from step to step (positions, context ends, page
counts, steps, the method's plan) from one static device buffer, refilled from the host before
each step by a single copy. The model forward over those buffers is then a fixed sequence of
kernels: on a CUDA device with a capturable op table (``engine.backend=triton``) it is captured
once per request and per S (tokens per sequence in the step) and replayed.

Capturing runs the step twice for real first (Triton compiles, cuBLAS initialises), so every
tensor the step mutates non-idempotently (the method state, the accounting) is snapshotted before
and restored after; K/V and page min/max writes of the same step are idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retrobench.methods.base import INT32_MAX, Accounting, Forward, ModelSpec


class StepBuffers:
    """The static per-step inputs of a request's decode steps, and one :class:`Forward` per S.

    Layout of the int64 buffer (B sequences, window W): positions ``[B, W]``, row steps ``[B, W]``,
    then ``[B]`` each: context ends, page counts, current steps, and the method's plan keys.
    Two pinned host buffers alternate, so a copy still in flight is never overwritten.
    """

    def __init__(
        self, batch: int, window: int, keys: Sequence[str], make_forward: Callable[..., Forward], device: torch.device
    ) -> None:
        self.B, self.W, self.keys = batch, window, tuple(keys)
        size = 2 * batch * window + batch * (3 + len(self.keys))
        pin = device.type == "cuda"
        self.hosts = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.copied = [torch.cuda.Event() if pin else None for _ in range(2)]  # host buffer free again
        self.turn = 0
        self.device_buf = torch.zeros(size, dtype=torch.int64, device=device)
        d = self.device_buf
        BW = batch * window
        self.pos = d[:BW].view(batch, window)
        self.q_step = d[BW : 2 * BW].view(batch, window)
        rest = d[2 * BW :].view(3 + len(self.keys), batch)
        self.ends, self.n_pages, self.step = rest[0], rest[1], rest[2]
        self.plan = {k: rest[3 + i] for i, k in enumerate(self.keys)}
        self._make = make_forward
        self.forwards: dict[int, Forward] = {}

    def forward(self, S: int) -> Forward:
        """The (reused) Forward of steps feeding S tokens per sequence: views of the static buffer."""
        if S not in self.forwards:
            self.forwards[S] = self._make(
                pos=self.pos[:, self.W - S :], q_step=self.q_step[:, self.W - S :], ends=self.ends,
                n_pages=self.n_pages, step=self.step, plan=self.plan,
            )  # fmt: skip
        return self.forwards[S]

    def load(self, positions: torch.Tensor, steps: Sequence[int], page_size: int, plan: dict[str, list[int]]) -> None:
        """Fill the buffer for one step: ``positions [B, S]`` (host), each sequence's current step, the plan."""
        B, S = positions.shape
        if B != self.B or S > self.W:
            raise ValueError(f"a step of shape {tuple(positions.shape)} does not fit batch {self.B}, window {self.W}")
        if set(plan) != set(self.keys):
            raise ValueError(f"the method's plan keys changed: {sorted(plan)} vs {sorted(self.keys)}")
        turn = self.turn
        self.turn ^= 1
        host = self.hosts[turn]
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # the copy that last read this buffer has run
        BW = B * self.W
        pos = host[:BW].view(B, self.W)
        q_step = host[BW : 2 * BW].view(B, self.W)
        rest = host[2 * BW :].view(3 + len(self.keys), B)
        pos[:, self.W - S :] = positions
        steps_t = torch.tensor(list(steps), dtype=torch.int64)
        rows = torch.arange(S - 1, dtype=torch.int64)
        q_step[:, self.W - S :] = torch.cat(
            [steps_t.view(B, 1) - (S - 1) + rows.view(1, -1), torch.full((B, 1), INT32_MAX, dtype=torch.int64)], dim=1
        )
        ends = positions[:, -1] + 1
        rest[0] = ends
        rest[1] = (ends + page_size - 1) // page_size
        rest[2] = steps_t
        for i, k in enumerate(self.keys):
            rest[3 + i] = torch.tensor(plan[k], dtype=torch.int64)
        self.device_buf.copy_(host, non_blocking=True)
        if self.copied[turn] is not None:
            self.copied[turn].record()


def make_forward(
    phase: str, ops: Any, cache: Any, state: Any, spec: ModelSpec, scaling: float, acct: Accounting, **tensors: Any
) -> Forward:
    return Forward(phase=phase, ops=ops, cache=cache, state=state, spec=spec, scaling=scaling, acct=acct, **tensors)


class GraphRunner:
    """Captures one decode forward (fixed B and S) in a CUDA graph and replays it.

    ``run(input_ids [B, S])`` copies the tokens into the static input and replays; the step's buffers
    must have been loaded first. Returns the static logits ``[B, V]`` (valid until the next run).
    """

    def __init__(
        self, forward: Callable[[torch.Tensor], torch.Tensor], mutable: list[torch.Tensor], input_ids: torch.Tensor,
        warmup: int = 2,
    ) -> None:  # fmt: skip
        self.ids = input_ids.clone()
        saved = [t.clone() for t in mutable]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                forward(self.ids)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = forward(self.ids)
        for t, s in zip(mutable, saved):
            t.copy_(s)

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(input_ids, non_blocking=True)
        self.graph.replay()
        return self.logits


class CaptureError(RuntimeError):
    """A decode step did something a CUDA-graph capture cannot hold (a host sync or a host tensor)."""


class CaptureGuard(TorchDispatchMode):
    """Fails, on any device, the operations that break the CUDA-graph capture of a decode step.

    A captured step must not synchronise with the host (``.item()``, ``int(t)``, ``bool(t)``,
    ``.tolist()``, data-dependent shapes such as boolean-mask indexing, ``nonzero``, ``unique``)
    and must not build tensors from host data (``torch.tensor([...])``, ``t[idx] = True``: on a GPU a
    host-to-device copy, forbidden while capturing from pageable memory). On CPU nothing fails by
    itself, so the engine's ``capture_check`` runs eager decode steps under this mode and every such
    operation raises :class:`CaptureError` naming it. Triton kernel launches are opaque (``paused``):
    under ``TRITON_INTERPRET=1`` their internals run on the host by design.
    """

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if not self.paused:
            why = _capture_hazard(func, args)
            if why:
                raise CaptureError(f"{func} in a decode step: {why}")
        return func(*args, **kwargs)

    def opaque(self, fn: Callable) -> Callable:
        """``fn`` with the guard paused while it runs (a Triton kernel launch)."""

        def run(*args: Any, **kwargs: Any) -> Any:
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1

        return run


_HAZARDS = {
    "_local_scalar_dense": "a host synchronisation (.item(), int(), float(), bool() or .tolist() of a tensor)",
    "lift_fresh": "a tensor built from host data (torch.tensor(...), or a Python scalar assigned by index)",
    "lift_fresh_copy": "a tensor built from host data (torch.tensor(...))",
    "nonzero": "a data-dependent shape (host synchronisation)",
    "unique": "a data-dependent shape (host synchronisation)",
    "_unique2": "a data-dependent shape (host synchronisation)",
    "unique_consecutive": "a data-dependent shape (host synchronisation)",
    "masked_select": "a data-dependent shape (host synchronisation)",
    "repeat_interleave": None,  # fine with static repeats; a tensor of repeats syncs (checked below)
}


def _capture_hazard(func: Any, args: tuple) -> str | None:
    name = func.overloadpacket.__name__
    if name == "repeat_interleave":
        return "a data-dependent shape (repeats given as a tensor)" if args and isinstance(args[0], torch.Tensor) and \
            len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].numel() > 1 else None  # fmt: skip
    if name in _HAZARDS:
        return _HAZARDS[name]
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return "boolean-mask indexing (a data-dependent shape, host synchronisation)"
    return None
