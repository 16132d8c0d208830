"""Run orchestration behind ``python -m retrobench run``: validate, then generate, score and store.

Order matters (DESIGN.md "Bad input"): every setting is checked first — the method and task are
instantiated (their ``__post_init__`` validates), the engine settings, the context length
against the model's limit, the model's files and the logger — and only then is the model
loaded and the run folder created. A bad setting therefore costs no model load and writes
nothing to the result store; it prints one line ``error: <key> ...`` and exits with code 2.

The run itself loops over the task's samples, skipping those already in ``samples.jsonl``
(resume after a kill), runs each in the task's mode (generate, teacher-forced perplexity or
fidelity to full attention: :mod:`retrobench.modes`; full-attention references are cached in
``<results_dir>/reference/``), appends one fsync'ed JSON line per sample, and writes
``metrics.json`` when every sample is done (see :mod:`retrobench.results` and
:mod:`retrobench.metrics`).

Jobs of one multirun share their process (Hydra's basic launcher runs them one after another;
a joblib worker runs several), so the last loaded model is kept per process and reused by the
next job with the same model, device and dtype (:func:`load_model_cached`). Under a parallel
launcher each job on ``device: cuda`` claims a whole free GPU first (:mod:`retrobench.gpus`).
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from retrobench import gpus, results
from retrobench.metrics import aggregate
from retrobench.modes import RunContext, encode_prompt, run_sample, sample_seed
from retrobench.reference import ReferenceStore
from retrobench.validation import RunConfigError, fail, validate

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
    from retrobench.tasks.base import TaskConfigError

    for sample in samples:
        if "prompt_ids" in sample.meta:  # teacher-forced samples carry their tokens
            need = len(sample.meta["prompt_ids"]) + len(sample.meta.get("target_ids", ()))
        else:
            need = len(encode_prompt(tokenizer, sample.prompt, bool(task.chat_template))) + int(task.max_new_tokens)
        if need > max_context:
            raise TaskConfigError(
                f"sample {sample.id}: prompt + task.max_new_tokens = {need} tokens exceeds model.max_context = "
                f"{max_context}; shorten the task (e.g. task.num_questions, task.context_tokens) or task.max_new_tokens"
            )


#: ``{key: (model, tokenizer)}`` of the one model this process holds (see :func:`load_model_cached`).
_LOADED: dict[str, tuple[Any, Any]] = {}


def load_model_cached(model_cfg: DictConfig, device: str, dtype: Any) -> tuple[Any, Any]:
    """:func:`retrobench.models.load_model`, reusing this process's last model when it is the same.

    Only one model is kept: loading another frees the previous one first (a GPU never holds two).
    The engine never changes the model's weights, so reuse across runs is exact.
    """
    import json

    from retrobench.models import load_model

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
    """Hydra task function (see :mod:`retrobench.cli`)."""
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
    from retrobench.methods.base import ConfigError
    from retrobench.tasks.base import TaskConfigError

    try:
        method, task = validate(cfg)
    except (RunConfigError, ConfigError, TaskConfigError) as exc:
        fail(str(exc))
    folder = results.run_dir(cfg)
    if results.finished(folder) and not cfg.overwrite:
        print(f"skip: {folder} is finished (metrics.json exists); overwrite=true reruns it", flush=True)
        return folder

    from retrobench.engine import Engine
    from retrobench.models import ModelConfigError, eos_token_ids

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
    except (ConfigError, TaskConfigError, ModelConfigError) as exc:
        fail(str(exc))

    if cfg.overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / results.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results.write_env(folder, engine.backend, str(engine.device))
    samples_path = folder / results.SAMPLES_FILE
    done = {row["id"] for row in results.read_samples(samples_path)}
    todo = [(i, s) for i, s in enumerate(samples) if s.id not in done]
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
    try:
        for index, sample in todo:
            progress.begin()
            started = time.perf_counter()
            part = run_sample(ctx, sample, seed, progress.on_token)
            row = {
                "id": sample.id,
                "index": index,
                "seed": seed,
                "method": method.name,
                "task": task.name,
                "task_version": task.version,
                "model": cfg.model.get("name"),
                "backend": engine.backend,
                **part,
                "wall_s": time.perf_counter() - started,
            }
            score = row["score"]
            results.append_sample(samples_path, row)
            if wandb_run is not None:
                wandb_run.log({f"sample/{k}": v for k, v in score.items() if isinstance(v, (int, float))})
            progress.finish_sample(int(row["new_tokens"]), sum(row["step_times_s"]))
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
        **summary,
    }
    results.write_json(folder / results.METRICS_FILE, record)
    if wandb_run is not None:
        from retrobench.report import log_run_to_wandb

        wandb_run.summary.update({k: v for k, v in summary["metrics"].items() if v is not None})
        log_run_to_wandb(wandb_run, folder)  # the run's plots (decode time, ppl ratio by position)
        wandb_run.finish()
    headline = {
        "teacher_forced": ("nll", "ppl", "ppl_ratio"),
        "fidelity": ("top1_agreement", "kl_full_method"),
    }
    keys = ("n", *headline.get(getattr(task, "mode", "generate"), ("accuracy", "completion")), "tpot_p50_s")
    shown = {k: summary["metrics"].get(k) for k in keys}
    print(
        f"done: {folder} "
        + " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=n/a" for k, v in shown.items())
    )
    return folder


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


__all__ = ["RunConfigError", "encode_prompt", "execute", "main", "sample_seed", "validate"]
