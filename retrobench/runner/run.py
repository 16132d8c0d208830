"""Run orchestration behind ``python -m retrobench run``: validate, then generate, score and store.

Order matters (DESIGN.md "Bad input"): every setting is checked first — the method and task are
instantiated (their ``__post_init__`` validates), the engine settings, the context length
against the model's limit, the model's files and the logger — and only then is the model
loaded and the run folder created. A bad setting therefore costs no model load and writes
nothing to the result store; it prints one line ``error: <key> ...`` and exits with code 2.

The run itself loops over the task's samples, skipping those already in ``samples.jsonl``
(resume after a kill), runs each in the task's mode (generate, teacher-forced perplexity or
fidelity to full attention: :mod:`retrobench.runner.modes`; full-attention references are cached in
``<results_dir>/reference/``), appends one fsync'ed JSON line per sample, and writes
``metrics.json`` when every sample is done (see :mod:`retrobench.store.results` and
:mod:`retrobench.store.metrics`).

Jobs of one multirun share their process (Hydra's basic launcher runs them one after another;
a joblib worker runs several), so the last loaded model is kept per process and reused by the
next job with the same model, device and dtype (:func:`load_model_cached`). Under a parallel
launcher each job on ``device: cuda`` claims a whole free GPU first (:mod:`retrobench.runner.gpus`).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from retrobench.runner import gpus
from retrobench.store import results
from retrobench.store.metrics import aggregate
from retrobench.runner.modes import RunContext, encode_prompt, generate_job, generate_row, run_sample, sample_seed
from retrobench.runner.reference import ReferenceStore
from retrobench.conf import ConfigError
from retrobench.runner.validation import fail, validate

# ---- the run -----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (once per run)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Progress:
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


def _hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not inside a Hydra app
        return None


def _remove_empty(folder: Path | None, stop: Path) -> None:
    """Remove ``folder`` and its parents below ``stop`` while they are empty (Hydra's log dirs)."""
    if folder is None:
        return
    stop = stop.resolve()
    folder = folder.resolve()
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def check_prompt_lengths(task: Any, samples: list[Any], tokenizer: Any, max_context: int) -> None:
    """Fail before any run folder exists when a prompt plus its generation exceeds the model's context."""
    for sample in samples:
        if "prompt_ids" in sample.meta:  # teacher-forced samples carry their tokens
            need = len(sample.meta["prompt_ids"]) + len(sample.meta.get("target_ids", ()))
        else:
            need = len(encode_prompt(tokenizer, sample.prompt, bool(task.chat_template))) + int(task.max_new_tokens)
        if need > max_context:
            raise ConfigError(
                f"sample {sample.id}: prompt + task.max_new_tokens = {need} tokens exceeds model.max_context = "
                f"{max_context}; shorten the task (e.g. task.num_questions, task.context_tokens) or task.max_new_tokens"
            )


#: ``{key: (model, tokenizer)}`` of the one model this process holds (see :func:`load_model_cached`).
_LOADED: dict[str, tuple[Any, Any]] = {}


def load_model_cached(model_cfg: DictConfig, device: str, dtype: Any) -> tuple[Any, Any]:
    """:func:`retrobench.inputs.models.load_model`, reusing this process's last model when it is the same.

    Only one model is kept: loading another frees the previous one first (a GPU never holds two).
    The engine never changes the model's weights, so reuse across runs is exact.
    """
    import json

    from retrobench.inputs.models import load_model

    key = json.dumps(
        [OmegaConf.to_container(model_cfg, resolve=True), str(device), dtype], sort_keys=True, default=str
    )
    if key not in _LOADED:
        release_model()
        _LOADED[key] = load_model(model_cfg, device=device, dtype=dtype)
    return _LOADED[key]


def release_model() -> None:
    """Free the model this process holds (and its GPU memory)."""
    if not _LOADED:
        return
    import gc

    import torch

    _LOADED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(cfg: DictConfig) -> None:
    """Hydra task function (started by :func:`retrobench.runner.launch.launch`)."""
    hydra_dir = _hydra_output_dir()
    try:
        with gpus.assigned(cfg) as gpu:  # a parallel launcher's job takes a whole free GPU first
            try:
                execute(cfg)
            finally:
                if gpu is not None and gpus.oversubscribed():  # another worker may take this GPU next
                    release_model()
    finally:
        _remove_empty(hydra_dir, Path(str(cfg.results_dir)))


def execute(cfg: DictConfig) -> Path | None:
    """Validate, then run (or skip) the configured experiment; returns the run folder."""
    try:
        method, task = validate(cfg)
    except ConfigError as exc:
        fail(str(exc))
    folder = results.run_dir(cfg)
    if results.finished(folder) and not cfg.overwrite:
        print(f"skip: {folder} is finished (metrics.json exists); overwrite=true reruns it", flush=True)
        return folder

    from retrobench.engine import Engine
    from retrobench.inputs.models import eos_token_ids

    seed = int(cfg.seed)
    seed_everything(seed)
    try:
        model, tokenizer = load_model_cached(cfg.model, str(cfg.device), cfg.engine.dtype)
        engine = Engine(
            model,
            method,
            page_size=int(cfg.engine.page_size),
            prefill_chunk=int(cfg.engine.prefill_chunk),
            backend=str(cfg.engine.backend),
            probe_every=int(getattr(task, "probe_every", 0) or 0),
        )
        samples = task.samples(tokenizer, seed)
        check_prompt_lengths(task, samples, tokenizer, int(cfg.model.get("max_context") or engine.max_context))
    except ConfigError as exc:
        fail(str(exc))

    if cfg.overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / results.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results.write_env(folder, engine.backend, str(engine.device))
    samples_path = folder / results.SAMPLES_FILE
    kept, dropped = results.repair_samples(samples_path)
    done = {row["id"] for row in kept}
    todo = [(i, s) for i, s in enumerate(samples) if s.id not in done]
    if done or dropped:
        lines = f", {dropped} partial line{'s' if dropped != 1 else ''} dropped" if dropped else ""
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples done{lines}", flush=True)
    wandb_run = _wandb_start(cfg, folder) if cfg.logger.get("name") == "wandb" else None

    ctx = RunContext(
        model=model,
        tokenizer=tokenizer,
        engine=engine,
        task=task,
        store=ReferenceStore(str(cfg.results_dir)),
        model_identity=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        eos=eos_token_ids(model, tokenizer),
        temperature=float(cfg.engine.temperature),
        top_p=float(cfg.engine.top_p),
    )
    progress = _Progress(len(samples), len(samples) - len(todo), f"{method.name}/{task.name}")
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
                _generate_all(ctx, engine, jobs, todo, batch, grader, store, progress)
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

    rows = results.read_samples(samples_path)
    summary = aggregate(rows)
    record = {
        "run": folder.name,
        "method": method.name,
        "method_settings": method.settings(),
        "task": task.name,
        "task_version": task.version,
        "task_settings": task.settings(),
        "model": cfg.model.get("name"),
        "seed": seed,
        "backend": engine.backend,
        "device": str(engine.device),
        "batch_size": batch,
        **summary,
    }
    results.write_json(folder / results.METRICS_FILE, record)
    if wandb_run is not None:
        from retrobench.report import log_run_to_wandb

        wandb_run.summary.update({k: v for k, v in summary["metrics"].items() if v is not None})
        log_run_to_wandb(wandb_run, folder)  # the run's plots (decode time, ppl ratio by position)
        wandb_run.finish()
    headline = HEADLINE.get(getattr(task, "mode", "generate"), ("accuracy", "completion"))
    shown = {k: summary["metrics"].get(k) for k in ("n", *headline, "tpot_p50_s")}
    print(
        f"done: {folder} "
        + " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=n/a" for k, v in shown.items())
    )
    if _single_run():  # a multirun (and make reproduce) keeps one line per run
        print(run_summary(cfg, method, task, summary, folder), flush=True)
    return folder


def _generate_all(ctx: RunContext, engine: Any, jobs: list[Any], todo: list[tuple[int, Any]], batch: int,
                  grader: ThreadPoolExecutor | None, store: Any, progress: _Progress) -> None:
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


#: The metrics a run's summary leads with, per task mode.
HEADLINE = {"teacher_forced": ("nll", "ppl", "ppl_ratio"), "fidelity": ("top1_agreement", "kl_full_method")}


def _single_run() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.RUN
    except (ImportError, ValueError):  # not inside a Hydra app
        return True


def run_summary(cfg: DictConfig, method: Any, task: Any, summary: dict[str, Any], folder: Path) -> str:
    """A few lines for a person at the end of a run: headline metrics with 95% CIs, exposure and KV,
    decode speed, where the run lives and what to do next (with a word on what the offline 135M
    model can show when it scores zero)."""
    metrics, per = summary["metrics"], summary["summaries"]

    def cell(key: str, pct: bool = False) -> str | None:
        value = metrics.get(key)
        if value is None:
            return None
        scale, unit = (100.0, "%") if pct else (1.0, "")
        text = f"{key} {value * scale:.3g}{unit}"
        s = per.get(key)
        if s and s.get("n", 0) > 1:
            text += f" [{s['ci_low'] * scale:.3g}, {s['ci_high'] * scale:.3g}]"
        return text

    mode = getattr(task, "mode", "generate")
    pct = mode == "generate"
    head = [c for c in (cell(k, pct and k in ("accuracy", "completion")) for k in HEADLINE.get(mode, ("accuracy", "completion"))) if c]  # fmt: skip
    n = int(metrics.get("n") or 0)
    lines = [f"  {task.name} on {cfg.model.get('name')} with {method.name}, n={n} (95% bootstrap CIs over samples):"
             f" {', '.join(head) or 'no score'}"]  # fmt: skip
    kv = []
    for key, label in (("exposure", "exposure"), ("attended_kv", "attended KV"), ("resident_kv", "resident KV")):
        if metrics.get(key) is not None:
            kv.append(f"{label} {metrics[key]:.4g}")
    speed = []
    if metrics.get("tpot_p50_s"):
        speed.append(f"decode {metrics['tpot_p50_s'] * 1e3:.1f} ms/token p50 ({metrics.get('tokens_per_s') or 0:.1f} tok/s)")
    if metrics.get("ttft_p50_s"):
        speed.append(f"TTFT {metrics['ttft_p50_s']:.2f} s")
    if kv or speed:
        lines.append("  " + ", ".join(kv + speed))
    lines.append(f"  run folder: {folder} (samples.jsonl, metrics.json, env.json)")
    lines.append(f"  next: python -m retrobench report --results-dir {cfg.results_dir}")
    if str(cfg.model.get("name")) == "smollm2_135m" and mode == "generate" and not metrics.get("accuracy"):
        lines.append(
            "  note: SmolLM2-135M scores near 0 on these tasks with full attention too, so accuracy cannot "
            "separate methods here; compare them with task=fidelity (agreement with full attention) or "
            "task=ppl (perplexity by position), or by completion"
        )
    return "\n".join(lines)


def _wandb_start(cfg: DictConfig, folder: Path) -> Any:
    """Mirror the run to wandb (imported lazily; offline unless ``logger.mode=online``)."""
    import wandb

    log = cfg.logger
    return wandb.init(
        project=log.get("project"),
        entity=log.get("entity"),
        group=log.get("group"),
        tags=list(log.get("tags") or []),
        mode=log.get("mode", "offline"),
        dir=str(Path(str(cfg.results_dir)).resolve()),
        id=folder.name,
        name=f"{cfg.method.get('_target_', '').rsplit('.', 1)[-1]}-{folder.name}",
        resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
    )


__all__ = ["encode_prompt", "execute", "main", "sample_seed", "validate"]
