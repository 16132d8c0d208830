"""Running the samples of one run: one at a time, continuously batched, or with background grading.

:func:`run_samples` is the middle step of :func:`retrobench.runner.run.execute`: it runs every sample
not yet in ``samples.jsonl`` in the task's mode (:mod:`retrobench.runner.modes`) and appends one
fsync'ed row per sample as it finishes, so a kill loses at most the samples in flight. A tqdm bar
(:class:`Progress`) shows samples and decode speed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from retrobench.conf import ConfigError
from retrobench.runner.modes import RunContext, generate_job, generate_row, run_sample
from retrobench.runner.validation import fail
from retrobench.store import results


class Progress:
    """A tqdm bar over samples whose postfix shows the decode speed (tokens/s) of the current sample."""

    def __init__(self, total: int, done: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=done,
            desc=desc,
            unit="sample",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.first = self.last = 0.0

    def begin(self) -> None:
        self.first = self.last = 0.0

    def on_token(self, n: int) -> None:
        now = time.perf_counter()
        if n == 1:  # decode speed is measured from the first token on (prefill excluded)
            self.first = self.last = now
        elif now - self.last > 0.5:
            self.last = now
            self.show(n, now)

    def show(self, n: int, now: float | None = None) -> None:
        elapsed = (now or time.perf_counter()) - self.first
        if n > 1 and elapsed > 0:
            self.bar.set_postfix_str(f"{n} tok, {(n - 1) / elapsed:.1f} tok/s", refresh=False)

    def finish_sample(self, n: int, decode_s: float) -> None:
        if n > 1 and decode_s > 0:
            self.bar.set_postfix_str(f"{n} tok, {(n - 1) / decode_s:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def finish_batched(self, tokens: int, elapsed: float, batch: int) -> None:
        """A sample of a batched run finished: the postfix shows the run's throughput so far."""
        if elapsed > 0:
            self.bar.set_postfix_str(f"batch {batch}, {tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_samples(cfg: DictConfig, folder: Path, ctx: RunContext, samples: list[Any],
                 todo: list[tuple[int, Any]], seed: int, wandb_run: Any) -> int:
    """Run every sample of ``todo`` (one at a time, batched, or with background grading) and append
    its row to ``samples.jsonl`` as it finishes; returns the batch size used. Ctrl-C exits 130 and
    keeps the finished rows (the same command resumes)."""
    engine, task, method = ctx.engine, ctx.task, ctx.engine.method
    samples_path = folder / results.SAMPLES_FILE
    progress = Progress(len(samples), len(samples) - len(todo), f"{method.name}/{task.name}")
    if engine.device.type == "cuda":  # peak memory per run: a multirun reuses the process and its model
        import torch

        torch.cuda.reset_peak_memory_stats(engine.device)
    mode = getattr(task, "mode", "generate")
    jobs = [generate_job(ctx, sample, seed) for _, sample in todo] if mode == "generate" else []
    batch = batch_size(cfg.engine.get("batch_size", 1), engine, jobs)

    def store(index: int, sample: Any, part: dict[str, Any], wall_s: float) -> dict[str, Any]:
        row = {
            "id": sample.id,
            "index": index,
            "seed": seed,
            "method": method.name,
            "task": task.name,
            "task_version": task.version,
            "model": cfg.model.get("name"),
            "backend": engine.backend,
            "batch_size": batch,
            **part,
            "wall_s": wall_s,
        }
        results.append_sample(samples_path, row)
        if wandb_run is not None:
            wandb_run.log({f"sample/{k}": v for k, v in row["score"].items() if isinstance(v, (int, float))})
        return row

    background = bool(getattr(task, "background_scoring", False)) and bool(jobs)
    grader = ThreadPoolExecutor(max_workers=os.cpu_count() or 1) if background else None
    try:
        try:
            if batch > 1 or background:  # a sample's wall_s is the time since the previous one was stored
                generate_all(ctx, engine, jobs, todo, batch, grader, store, progress)
            for index, sample in todo if batch == 1 and not background else ():
                progress.begin()
                started = time.perf_counter()
                part = run_sample(ctx, sample, seed, progress.on_token)
                row = store(index, sample, part, time.perf_counter() - started)
                progress.finish_sample(int(row["new_tokens"]), sum(row["step_times_s"]))
        finally:
            if grader is not None:  # interrupted: queued gradings are dropped (their samples rerun on resume)
                grader.shutdown(wait=True, cancel_futures=True)
    except ConfigError as exc:  # e.g. a prompt longer than the engine's limit; finished samples stay
        progress.close()
        fail(str(exc))
    except KeyboardInterrupt:
        progress.close()
        print(
            f"interrupted: finished samples are in {samples_path}; rerun the same command to resume",
            file=sys.stderr,
        )
        sys.exit(130)
    progress.close()
    return batch


def generate_all(ctx: RunContext, engine: Any, jobs: list[Any], todo: list[tuple[int, Any]], batch: int,
                  grader: ThreadPoolExecutor | None, store: Any, progress: Progress) -> None:
    """Generate every job (continuous batching at ``batch``) and store each sample as it is scored:
    in the decode loop, or, with a ``grader`` pool (tasks whose scoring runs programs), in a grader
    thread while the engine decodes the next samples."""
    t_start, clock, tokens, lock = time.perf_counter(), [time.perf_counter()], [0], threading.Lock()
    graded: list[Any] = []

    def finish(index: int, sample: Any, gen: Any) -> None:
        part = generate_row(ctx, sample, gen)
        with lock:
            now = time.perf_counter()
            store(index, sample, part, now - clock[0])
            clock[0], tokens[0] = now, tokens[0] + len(gen.tokens)
            progress.finish_batched(tokens[0], now - t_start, batch)

    def on_done(i: int, gen: Any) -> None:
        index, sample = todo[i]
        if grader is not None:
            graded.append(grader.submit(finish, index, sample, gen))
        else:
            finish(index, sample, gen)

    engine.generate_batch(jobs, batch, on_done, eos_token_ids=ctx.eos, stop_strings=tuple(ctx.task.stop),
                          decode=ctx.tokenizer.decode)  # fmt: skip
    for future in graded:
        future.result()  # a grader error surfaces here


def batch_size(value: Any, engine: Any, jobs: list[Any]) -> int:
    """``engine.batch_size`` for this run's ``jobs``: at most one row per job; 1 when the task does
    not generate (teacher-forced and fidelity samples run one by one) or attention is probed;
    ``auto`` fits the memory (:func:`retrobench.engine.batch.auto_batch_size`)."""
    if len(jobs) < 2 or engine.probe_every:
        return 1
    if value == "auto":
        from retrobench.engine.batch import auto_batch_size

        return auto_batch_size(engine, max(len(j.prompt_ids) + j.max_new_tokens for j in jobs), len(jobs))
    return max(1, min(int(value), len(jobs)))


__all__ = ["Progress", "batch_size", "generate_all", "run_samples"]
