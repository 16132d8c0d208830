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

import random
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from retrobench.runner import gpus
from retrobench.store import results
from retrobench.store.metrics import aggregate
from retrobench.conf import ConfigError
from retrobench.runner.modes import RunContext, encode_prompt, sample_seed
from retrobench.runner.reference import ReferenceStore
from retrobench.runner.samples import run_samples
from retrobench.runner.validation import fail, validate

# ---- the run -----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (once per run)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """Validate, then run (or skip) the configured experiment; returns the run folder.

    The steps, each its own function: :func:`validate` (every setting, nothing loaded),
    :func:`_prepare` (model, engine, samples), :func:`_open_run` (the folder, resuming),
    :func:`~retrobench.runner.samples.run_samples` (generate, score, append a row per sample) and :func:`_finish` (metrics.json).
    """
    try:
        method, task = validate(cfg)
    except ConfigError as exc:
        fail(str(exc))
    folder = results.run_dir(cfg)
    if results.finished(folder) and not cfg.overwrite:
        print(f"skip: {folder} is finished (metrics.json exists); overwrite=true reruns it", flush=True)
        return folder
    seed = int(cfg.seed)
    seed_everything(seed)
    ctx, samples = _prepare(cfg, method, task, seed)
    todo = _open_run(cfg, folder, ctx.engine, samples)
    wandb_run = _wandb_start(cfg, folder) if cfg.logger.get("name") == "wandb" else None
    batch = run_samples(cfg, folder, ctx, samples, todo, seed, wandb_run)
    _finish(cfg, folder, ctx, seed, batch, wandb_run)
    return folder


def _prepare(cfg: DictConfig, method: Any, task: Any, seed: int) -> tuple[RunContext, list[Any]]:
    """Load the model (cached per process), build the engine and the task's samples; a setting that
    only shows now (a prompt past the model's context) fails before any run folder exists."""
    from retrobench.engine import Engine
    from retrobench.inputs.models import eos_token_ids

    try:
        model, tokenizer = load_model_cached(cfg.model, str(cfg.device), cfg.engine.dtype)
        engine = Engine(
            model,
            method,
            page_size=int(cfg.engine.page_size),
            prefill_chunk=cfg.engine.prefill_chunk,
            backend=str(cfg.engine.backend),
            compile=cfg.engine.get("compile", "auto"),
            probe_every=int(getattr(task, "probe_every", 0) or 0),
        )
        samples = task.samples(tokenizer, seed)
        check_prompt_lengths(task, samples, tokenizer, int(cfg.model.get("max_context") or engine.max_context))
    except ConfigError as exc:
        fail(str(exc))
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
    return ctx, samples


def _open_run(cfg: DictConfig, folder: Path, engine: Any, samples: list[Any]) -> list[tuple[int, Any]]:
    """Create (or, with ``overwrite``, recreate) the run folder with its config and env; returns the
    ``(index, sample)`` pairs not yet in ``samples.jsonl`` (a half-written last line is dropped)."""
    if cfg.overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / results.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results.write_env(folder, engine.backend, str(engine.device))
    kept, dropped = results.repair_samples(folder / results.SAMPLES_FILE)
    done = {row["id"] for row in kept}
    todo = [(i, s) for i, s in enumerate(samples) if s.id not in done]
    if done or dropped:
        lines = f", {dropped} partial line{'s' if dropped != 1 else ''} dropped" if dropped else ""
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples done{lines}", flush=True)
    return todo


def _finish(cfg: DictConfig, folder: Path, ctx: RunContext, seed: int, batch: int, wandb_run: Any) -> None:
    """Aggregate the rows into ``metrics.json`` (written last: it marks the run finished), close the
    wandb run, and print the run's ``done:`` line (and its summary when it is a single run)."""
    engine, task, method = ctx.engine, ctx.task, ctx.engine.method
    rows = results.read_samples(folder / results.SAMPLES_FILE)
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
        "compile": engine.compile,
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
