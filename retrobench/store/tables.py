"""The one reader of the result store: :func:`load_runs` (one row per finished run) and
:func:`load_samples` (one row per sample), for the report, the studies and notebooks alike.

Columns of :func:`load_runs`: :data:`KEY_COLUMNS` first (run hash, model, method, ``label`` =
method plus the settings that distinguish its runs, e.g. ``retro(w=2)``, base, window, budget
fraction and tokens, task, dataset, num_questions, seed, backend), then every other method setting,
task_version, device, ``task.*`` and ``engine.*`` settings, ``env.*`` provenance and every metric
of ``metrics.json`` (listed in ``frame.attrs["metrics"]``); ``frame.attrs["settings"]`` names, per
method, the setting columns its runs recorded. :func:`load_samples` has the same run
columns plus each sample's fields, scores and stats. Both read only: a damaged line is skipped,
never repaired. A long (run x metric) frame is ``runs.melt(id_vars=[...], value_vars=runs.attrs["metrics"])``.

The columns come from what each run recorded (``metrics.json``'s method and task settings,
``config.yaml``'s engine, ``env.json``), so a new method or setting needs no change here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retrobench.store import results

#: Method settings that get their own name in the tables (the rest keep theirs, dots -> "_").
_SETTING_NAMES = {"budget.fraction": "budget_fraction", "budget.tokens": "budget_tokens"}
#: Short names of settings inside labels.
_LABEL_NAMES = {"window": "w"}
#: Settings never shown in labels (budgets have their own columns).
_NOT_IN_LABEL = ("budget_fraction", "budget_tokens")
#: Provenance kept from ``env.json`` as ``env.<key>`` columns.
ENV_KEYS = ("git_sha", "git_dirty", "device", "device_name", "hostname", "torch", "transformers", "triton")
#: Columns of the samples table that come from the sample row itself (not its score/stats).
_SAMPLE_FIELDS = ("id", "index", "prompt_tokens", "new_tokens", "finish_reason", "ttft_s", "wall_s")


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _dataset(task_settings: Mapping[str, Any]) -> Any:
    """The dataset-like setting of a task (longgenbench dataset, reasoning benchmark, ...)."""
    for key in ("dataset", "benchmark", "kind", "source"):
        if task_settings.get(key) is not None:
            return task_settings[key]
    return None


def _setting_columns(settings: Mapping[str, Any]) -> list[str]:
    """The table columns of the method settings a run recorded (``budget.fraction`` -> ``budget_fraction``)."""
    return [_SETTING_NAMES.get(k, k.replace(".", "_")) for k, v in settings.items() if k != "method" and _scalar(v)]


def _default_setting(method: Any, key: str) -> Any:
    """``key``'s default in ``conf/method/<method>.yaml`` (None when the method or key has none)."""
    from retrobench.conf import conf_dir

    return _load_yaml(conf_dir() / "method" / f"{method}.yaml").get(key)


def _run_record(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(keys, metrics)`` of one finished run folder: identifying columns and metrics.json metrics."""
    info = json.loads((folder / results.METRICS_FILE).read_text())
    env = json.loads((folder / results.ENV_FILE).read_text()) if (folder / results.ENV_FILE).is_file() else {}
    config = _load_yaml(folder / results.CONFIG_FILE)
    settings = dict(info.get("method_settings") or {})
    settings.pop("method", None)
    task = dict(info.get("task_settings") or {})
    source = task.get("source_settings") if isinstance(task.get("source_settings"), Mapping) else {}
    keys: dict[str, Any] = {
        "run": folder.name,
        "model": info.get("model"),
        "method": info.get("method"),
        "label": info.get("method"),
        "base": settings.pop("base", None),
        "window": settings.pop("window", None),
        "budget_fraction": settings.pop("budget.fraction", None),
        "budget_tokens": settings.pop("budget.tokens", None),
    }
    for key, value in settings.items():
        if _scalar(value):
            keys[_SETTING_NAMES.get(key, key.replace(".", "_"))] = value
    keys.update(
        task=info.get("task"),
        task_version=info.get("task_version"),
        dataset=_dataset(task) if _dataset(source) is None else _dataset(source),
        num_questions=task.get("num_questions", source.get("num_questions")),
        seed=info.get("seed"),
        backend=info.get("backend"),
        device=info.get("device"),
    )
    for key, value in task.items():
        if key not in ("task", "task_version") and _scalar(value):
            keys[f"task.{key}"] = value
    for key, value in (config.get("engine") or {}).items():
        if _scalar(value):
            keys[f"engine.{key}"] = value
    for key in ENV_KEYS:
        keys[f"env.{key}"] = env.get(key)
    metrics = {k: (float("nan") if v is None else v) for k, v in (info.get("metrics") or {}).items()}
    return keys, metrics


def label_runs(rows: list[dict[str, Any]]) -> None:
    """Set ``label``: the method plus every method or engine setting that differs between its runs of
    one task (in place), e.g. ``retro(w=2, past_query=cached)`` or ``quest(engine.page_size=32)``.
    Settings are compared within a task: the reasoning runs' sampling temperature does not relabel
    the LongGenBench runs.

    A method whose runs record a window (retro) always shows it (``retro(w=2)``), and a recorded
    base method that differs from the method's configured default is shown too.
    """
    ignore = {"run", "model", "method", "label", "task", "task_version", "dataset", "num_questions", "seed"}
    ignore |= {"backend", "device", *_NOT_IN_LABEL}
    by_method: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault((row.get("task"), row["method"]), []).append(row)
    for (_, method), group in by_method.items():
        keys = list(dict.fromkeys(
            k for r in group for k in r if k not in ignore and not k.startswith(("task.", "env."))
        ))  # fmt: skip
        varying = [k for k in keys if len({json.dumps(r.get(k), default=str) for r in group}) > 1]
        if any(r.get("window") is not None for r in group):
            varying = ["window"] + [k for k in varying if k != "window"]
        if any(r.get("base") is not None for r in group) and "base" not in varying:
            default = _default_setting(method, "base")
            if any(r.get("base") not in (None, default) for r in group):
                varying.insert(0, "base")
        for row in group:
            parts = [f"{_LABEL_NAMES.get(k, k)}={short(row.get(k))}" for k in varying]
            row["label"] = f"{method}({', '.join(parts)})" if parts else str(method)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete JSON rows of a ``samples.jsonl``, read only: unlike
    :func:`retrobench.store.results.read_samples`, a broken or duplicate line is skipped without repairing
    the file (readers never write to the store)."""
    if not Path(path).is_file():
        return []
    rows, seen = [], set()
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("id") not in seen:
            seen.add(row.get("id"))
            rows.append(row)
    return rows


def _finished_runs(results_dir: str | Path) -> tuple[list[tuple[Path, dict[str, Any], dict[str, Any]]], dict[str, list[str]]]:
    """``(records, settings)``: ``(folder, keys, metrics)`` per finished run, and per method the
    setting columns its runs recorded (``frame.attrs["settings"]``)."""
    records, settings = [], {}
    for folder in results.run_folders(results_dir):
        try:
            keys, metrics = _run_record(folder)
            info = json.loads((folder / results.METRICS_FILE).read_text())
        except (OSError, ValueError) as exc:  # a corrupt metrics.json is skipped, not fatal
            print(f"warning: skipping {folder}: {exc}")
            continue
        records.append((folder, keys, metrics))
        columns = settings.setdefault(str(keys["method"]), [])
        columns += [c for c in _setting_columns(info.get("method_settings") or {}) if c not in columns]
    label_runs([keys for _, keys, _ in records])
    return records, settings


def _frame(records: list[dict[str, Any]], first: Sequence[str]) -> Any:
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=list(first))
    cols = [c for c in first if c in frame.columns] + [c for c in frame.columns if c not in first]
    frame = frame[cols]
    for col in ("window", "budget_fraction", "budget_tokens", "num_questions", "seed"):
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


#: Leading columns of both tables.
KEY_COLUMNS = (
    "run",
    "model",
    "method",
    "label",
    "base",
    "window",
    "budget_fraction",
    "budget_tokens",
    "task",
    "dataset",
    "num_questions",
    "seed",
    "backend",
)


def load_runs(results_dir: str | Path = "results") -> Any:
    """One pandas row per finished run (see the module docstring for the columns).

    Metric columns are exactly the keys of ``metrics.json``'s ``metrics`` (null -> NaN); the list
    is in ``frame.attrs["metrics"]``.
    """
    records, metric_names = [], []
    runs, settings = _finished_runs(results_dir)
    for _, keys, metrics in runs:
        records.append({**keys, **metrics})
        metric_names += [m for m in metrics if m not in metric_names]
    frame = _frame(records, KEY_COLUMNS)
    for name in metric_names:
        frame[name] = numeric(frame[name])
    frame.attrs["metrics"] = metric_names
    frame.attrs["settings"] = settings
    return frame


def load_samples(results_dir: str | Path = "results", text: bool = False) -> Any:
    """One pandas row per sample of every finished run.

    Columns: the run columns of :func:`load_runs` (without its metrics), the sample's ``id``,
    ``index``, ``prompt_tokens``, ``new_tokens``, ``finish_reason``, ``ttft_s``, ``wall_s``,
    ``tpot_p50_s``, every numeric score key and every numeric engine stat (``exposure``,
    ``attended_kv``...; a stat whose name is also a score key is kept as ``stats.<key>``).
    ``text=True`` adds the generated ``output``. ``frame.attrs["scores"]`` lists the score columns.
    """
    records, scores = [], []
    runs, settings = _finished_runs(results_dir)
    for folder, keys, _ in runs:
        for row in read_rows(folder / results.SAMPLES_FILE):
            flat = dict(keys)
            for field in _SAMPLE_FIELDS:
                if field in row:
                    flat[field] = row[field]
            tpot = row.get("tpot_s")
            flat["tpot_p50_s"] = tpot.get("p50") if isinstance(tpot, Mapping) else None
            score = row.get("score") or {}
            for key, value in score.items():
                if isinstance(value, (int, float)):
                    name = key if key not in keys else f"score.{key}"
                    flat[name] = float(value)
                    if name not in scores:
                        scores.append(name)
            for key, value in (row.get("stats") or {}).items():
                if isinstance(value, (int, float)):
                    name = key if key not in keys and key not in score else f"stats.{key}"
                    flat[name] = float(value)
            if text:
                flat["output"] = row.get("output")
            records.append(flat)
    frame = _frame(records, (*KEY_COLUMNS, "id"))
    frame.attrs["scores"] = scores
    frame.attrs["settings"] = settings
    return frame


def short(value: Any) -> str:
    """A value as table text: ``2.0`` -> ``2``, anything else ``str``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def numeric(series: Any) -> Any:
    """A pandas column as floats (non-numbers -> NaN)."""
    import pandas as pd

    return pd.to_numeric(series, errors="coerce").astype(float)


__all__ = ["ENV_KEYS", "KEY_COLUMNS", "label_runs", "load_runs", "load_samples", "numeric", "read_rows", "short"]
