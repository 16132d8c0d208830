"""``make reproduce``: run every paper artefact as a Hydra multirun, resumably, then write the report.

``python -m retrobench.reproduce [--profile small|paper|tiny] [--only NAME,...] [--dry-run]
[--results-dir DIR] [--no-report] [--list FILE] [OVERRIDE ...]``

The list of artefacts is ``conf/reproduce.yaml``: each entry names an experiment overlay
(``conf/experiment/``) and a grid (``conf/sweep/``). A *profile* of the same file adapts every
entry to a machine without changing the list: ``paper`` runs the hub models on a GPU; ``small``
(the default without a GPU) runs everything on ``smollm2_135m`` with offline data and shortened
lengths; ``tiny`` runs on ``tiny_random`` for tests. For each entry the driver runs

    python -m retrobench run -m experiment=<experiment> <grid axes> <profile overrides> [OVERRIDE ...]

as a Hydra multirun inside its own process, so the model stays loaded from one run and one entry
to the next (extra ``OVERRIDE`` s, e.g. ``hydra/launcher=local_gpus``, go to every run). It numbers
the runs as they finish, does not launch an entry whose runs are all finished (every Qwen entry of
the small profile, where the model is replaced, shares its runs with the main table), and goes on
to the next entry when one fails. Resumability comes from the result store: a run whose
``metrics.json`` exists is skipped and a killed run resumes at its next sample, so killing the
driver at any point and starting it again loses nothing and repeats nothing. At the end it writes
the report (``python -m retrobench report``) unless ``--no-report``; the exit code is non-zero when
an entry or the report failed (130 when interrupted).

``--dry-run`` prints each entry's command and how many of its runs are distinct, shared with an
earlier entry, and already finished (it composes every grid point; it runs nothing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from retrobench.conf import conf_dir
from retrobench.tasks.lib.offline_data import write_offline_data

LIST_FILE = "reproduce.yaml"
OFFLINE_TOKEN = "{offline_data}"
OFFLINE_FOLDER = "offline"


@dataclass
class Entry:
    """One artefact of the list: its experiment overlay, its grid and the profile's overrides."""

    name: str
    experiment: str
    sweep: str
    task: str
    axes: dict[str, str] = field(default_factory=dict)  # key -> Hydra sweep value ("a,b", "range(1,9)")
    overrides: list[str] = field(default_factory=list)  # fixed key=value overrides

    def args(self, results_dir: str, extra: list[str]) -> list[str]:
        """Everything after ``python -m retrobench run``; an ``extra`` override replaces the axis or the
        fixed override of its key (``seed=0`` runs one seed, ``seed=0,1,2,3,4`` five)."""
        mine = {_key(o) for o in extra}
        axes = [f"{k}={v}" for k, v in self.axes.items() if k not in mine]
        fixed = [o for o in self.overrides if _key(o) not in mine]
        return ["-m", f"experiment={self.experiment}", *axes, *fixed, f"results_dir={results_dir}", *extra]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def load_list(path: Path | None = None) -> dict[str, Any]:
    """The list file (default ``conf/reproduce.yaml``) as plain data."""
    return OmegaConf.to_container(OmegaConf.load(path or conf_dir() / LIST_FILE))  # type: ignore[return-value]


def experiment_task(experiment: str, root: Path | None = None) -> str:
    """The task group choice that ``experiment=<experiment>`` selects."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(root or conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return str(cfg.hydra.runtime.choices.task)


def sweep_axes(sweep: str, root: Path | None = None) -> dict[str, str]:
    """``hydra.sweeper.params`` of ``conf/sweep/<sweep>.yaml`` (key -> sweep value string)."""
    data = OmegaConf.load((root or conf_dir()) / "sweep" / f"{sweep}.yaml")
    params = OmegaConf.select(data, "hydra.sweeper.params") or {}
    return {str(k): str(v) for k, v in params.items()}


def entries(
    profile: str, only: list[str] | None = None, root: Path | None = None, list_file: Path | None = None
) -> list[Entry]:
    """The list's entries adapted to ``profile`` (in list order; ``only`` keeps those names).

    ``root`` is the config folder (default: the installed ``retrobench.conf``); ``list_file`` the
    list (default ``<root>/reproduce.yaml``).
    """
    spec = load_list(list_file or (root or conf_dir()) / LIST_FILE)
    profiles = spec.get("profiles") or {}
    if profile not in profiles:
        raise SystemExit(f"error: --profile {profile} is not a profile; allowed: {', '.join(profiles)}")
    prof = profiles[profile] or {}
    names = [e["name"] for e in spec["experiments"]]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise SystemExit(f"error: --only {','.join(unknown)} is not in the list; allowed: {', '.join(names)}")
    out = []
    for item in spec["experiments"]:
        if only and item["name"] not in only:
            continue
        experiment = item.get("experiment", item["name"])
        task = experiment_task(experiment, root)
        axes = sweep_axes(item.get("sweep", experiment), root)
        own = (prof.get("entries") or {}).get(item["name"]) or {}
        for key, value in {**(prof.get("axes") or {}), **(own.get("axes") or {})}.items():
            if key in axes:
                axes[key] = str(value)
        fixed = [
            *(prof.get("overrides") or []),
            *((prof.get("task") or {}).get(task) or []),
            *(own.get("overrides") or []),
        ]
        fixed = list({_key(o): o for o in fixed if _key(o) not in axes}.values())  # the last of a key wins
        out.append(Entry(item["name"], experiment, item.get("sweep", experiment), task, axes, fixed))
    return out


def default_profile() -> str:
    """``paper`` when a CUDA GPU is visible, else ``small``."""
    try:
        import torch

        return "paper" if torch.cuda.is_available() else "small"
    except ImportError:  # pragma: no cover
        return "small"


def _substitute(entry: Entry, offline: Path) -> Entry:
    entry.overrides = [o.replace(OFFLINE_TOKEN, str(offline)) for o in entry.overrides]
    return entry


# ---- planning ------------------------------------------------------------------------------------


def grid(entry: Entry, results_dir: str, extra: list[str]) -> list[list[str]]:
    """The override list of every job of the entry's multirun, in the order Hydra's basic sweeper
    runs them: the product of each override's values (``a=1,2``, ``choice(...)``), last key fastest."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in entry.args(results_dir, extra) if a != "-m"]
    options = []
    for override in OverridesParser.create().parse_overrides(args):
        key = override.get_key_element()
        if override.is_sweep_override() and not override.is_discrete_sweep():
            raise ValueError(f"{override.input_line}: a range or interval sweep cannot be listed; give the values (a=1,2)")
        values = override.sweep_string_iterator() if override.is_sweep_override() else [override.get_value_element_as_str()]
        options.append([f"{key}={value}" for value in values])
    return [list(job) for job in itertools.product(*options)]


def run_folders(entry: Entry, results_dir: str, extra: list[str]) -> list[Path]:
    """The result-store folder of every job of the entry (composes each job's config; runs nothing)."""
    return [folder for folder, _ in run_configs(entry, results_dir, extra)]


def run_configs(entry: Entry, results_dir: str, extra: list[str]) -> list[tuple[Path, Any]]:
    """``(folder, composed config)`` of every job of the entry.

    Jobs that choose the same config groups (model, method, task, experiment...) share one
    composition; each job's value overrides (``seed=1``, ``method.window=4``) are then applied to a
    copy, as Hydra applies them after composing. A job with an override this cannot apply that way
    (``+key``, ``~key``) is composed in full. Same folders as composing every job, a fraction of the time.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    from retrobench.store import results

    root = conf_dir()
    parser = OverridesParser.create()
    composed: dict[tuple[str, ...], Any] = {}
    folders = []
    with initialize_config_dir(str(root), version_base="1.3"):
        for job in grid(entry, results_dir, extra):
            job = [o for o in job if not o.startswith("hydra")]
            parsed = parser.parse_overrides(job)
            groups = tuple(o for o, p in zip(job, parsed) if (root / p.key_or_group).is_dir())
            values = [(o, p) for o, p in zip(job, parsed) if o not in groups]
            if any(p.is_add() or p.is_delete() or p.is_force_add() for _, p in values):
                cfg = compose("config", overrides=job)
                folders.append((results.run_dir(cfg), cfg))
                continue
            if groups not in composed:
                composed[groups] = compose("config", overrides=list(groups))
            cfg = OmegaConf.create(OmegaConf.to_container(composed[groups]))
            with open_dict(cfg):
                for _, override in values:
                    OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
            folders.append((results.run_dir(cfg), cfg))
    return folders


def plan(items: list[Entry], results_dir: str, extra: list[str]) -> list[dict[str, Any]]:
    """Per entry: jobs, distinct runs first seen here, runs shared with earlier entries, finished runs,
    and per model the tokens its unfinished runs decode at most (``Task.workload``)."""
    from hydra.utils import instantiate

    from retrobench.store import results

    seen: set[Path] = set()
    out = []
    for entry in items:
        jobs = run_configs(entry, results_dir, extra)
        configs = dict(jobs)
        new = [f for f in configs if f not in seen]
        seen.update(new)
        tokens: dict[str, int] = {}
        for folder in new:
            if results.finished(folder):
                continue
            cfg = configs[folder]
            samples, per_sample = instantiate(cfg.task, _convert_="all").workload()
            model = str(cfg.model.get("name"))
            tokens[model] = tokens.get(model, 0) + samples * per_sample
        out.append({
            "jobs": len(jobs),
            "new": len(new),
            "shared": len(jobs) - len(new),
            "finished": sum(results.finished(f) for f in new),
            "tokens": tokens,
        })  # fmt: skip
    return out


#: Where ``make gpu-batch`` writes its measured batched throughput (a clone has the committed one).
BATCH_BENCH = Path(__file__).resolve().parents[2] / "results" / "bench" / "batch.csv"


def measured_throughput(path: Path = BATCH_BENCH) -> dict[str, Any] | None:
    """The batched row of ``bench_batch``'s table: tokens/s with what it was measured on."""
    import csv

    if not path.is_file():
        return None
    rows = [r for r in csv.DictReader(path.open()) if r.get("batch_size") not in (None, "", "1") and r.get("tokens_per_s")]
    return {**rows[0], "tokens_per_s": float(rows[0]["tokens_per_s"])} if rows else None


def gpu_time_lines(tokens: dict[str, int], rate: dict[str, Any] | None) -> list[str]:
    """The plan's GPU time: decode tokens per model at the measured batched throughput."""
    if not tokens:
        return ["GPU time: every planned run is finished"]
    total = sum(tokens.values())
    if rate is None:
        return [f"GPU time: {total / 1e6:.2f}M tokens to decode at most; no measured throughput "
                f"({BATCH_BENCH.relative_to(BATCH_BENCH.parents[2])}: run make gpu-batch on a GPU)"]  # fmt: skip
    tps = rate["tokens_per_s"]
    lines = [
        f"GPU time (an upper bound: every sample decodes its full max_new_tokens) at {tps:.0f} tokens/s, the batched "
        f"throughput bench_batch measured ({rate.get('method')} on {rate.get('model')}, {rate.get('task')}, batch "
        f"{rate.get('batch_size')}, {rate.get('device')}, git {str(rate.get('git_sha'))[:7]}; prefill included):"
    ]
    for model, n in sorted(tokens.items(), key=lambda kv: -kv[1]):
        amount = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"
        lines.append(f"  {model}: {amount} tokens, {n / tps / 3600:.2f} GPU-h")
    lines.append(f"  total: {total / 1e6:.2f}M tokens, {total / tps / 3600:.2f} GPU-h at that rate; decode is bound by "
                 "weight reads, so a model k times the 8B one's size takes about k times longer (Qwen2.5-14B ~1.8x, "
                 "32B ~4x), and longer prompts than the measured run's add prefill time")  # fmt: skip
    return lines


# ---- running --------------------------------------------------------------------------------------


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def run_entry(
    entry: Entry, index: int, total: int, results_dir: str, extra: list[str], started: float
) -> int:
    """Run one entry as a Hydra multirun in this process; returns its exit code (0 when ok).

    The run layer starts the jobs (:func:`retrobench.runner.launch.launch`); which of the entry's
    planned run folders finished is then read from the store, not from the jobs' output. Jobs share
    this process, so a model stays loaded across entries (``retrobench.runner.run``'s cache). An
    entry whose runs are all finished (e.g. shared with earlier entries) is not launched.
    """
    from retrobench.runner.launch import launch, prepare_run
    from retrobench.store import results

    folders = run_folders(entry, results_dir, extra)
    todo = [f for f in dict.fromkeys(folders) if not results.finished(f)]
    head = f"[{index}/{total}] {entry.name}: {len(folders)} runs"
    if not todo:
        print(f"{head}, all finished (or shared with earlier entries): nothing to run", flush=True)
        return 0
    print(f"{head}, {len(todo)} to run", flush=True)
    args = ["run", *entry.args(results_dir, extra)]
    print("  $ python -m retrobench " + " ".join(_quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    overrides, error = prepare_run(args[1:])
    if error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        code = 2
    else:
        try:
            launch(overrides)
            code = 0
        except SystemExit as exc:  # a job's config error (exit 2), Hydra's own failures (exit 1), Ctrl-C (130)
            code = exc.code if isinstance(exc.code, int) else 1
    done = sum(results.finished(f) for f in todo)
    if code == 0 and done < len(todo):
        code = 1
    state = "ok" if code == 0 else f"FAILED (exit {code})"
    print(
        f"[{index}/{total}] {entry.name}: {state}, {done} run, {len(folders) - len(todo)} skipped, "
        f"{_fmt(time.perf_counter() - t0)} ({_fmt(time.perf_counter() - started)} total)",
        flush=True,
    )
    return code


def report(results_dir: str) -> int:
    """``python -m retrobench report`` over ``results_dir`` (a subprocess); returns its exit code."""
    cmd = [sys.executable, "-m", "retrobench", "report", f"results_dir={results_dir}"]
    print("report: $ python " + " ".join(_quote(c) for c in cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # the checkout's kernels/ never shadows the PyPI package
    return subprocess.run(cmd, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retrobench.reproduce",
        description="Run the paper's artefacts (conf/reproduce.yaml) as resumable Hydra multiruns, then the report.",
    )
    parser.add_argument(
        "--profile", default=None, help="paper | small | tiny (default: paper with a GPU, else small)"
    )
    parser.add_argument("--only", default=None, help="comma-separated entry names of conf/reproduce.yaml")
    parser.add_argument("--results-dir", default="results", help="result store root (default: results)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and what is finished; run nothing"
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip `python -m retrobench report` at the end"
    )
    parser.add_argument("--list", default=None, help="another list file in the format of conf/reproduce.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides for every run, e.g. hydra/launcher=local_gpus; one of a grid's keys "
        "replaces that axis (seed=0: one seed)",
    )
    args = parser.parse_args(argv)

    profile = args.profile or default_profile()
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    results_dir = str(Path(args.results_dir).expanduser().resolve())
    offline = Path(results_dir) / OFFLINE_FOLDER
    list_file = Path(args.list).expanduser().resolve() if args.list else None
    items = [_substitute(e, offline) for e in entries(profile, only, list_file=list_file)]
    if not args.dry_run and any(OFFLINE_TOKEN in o or str(offline) in o for e in items for o in e.overrides):
        write_offline_data(offline)  # a plan writes nothing: run folders depend on the path, not the data

    print(f"reproduce: profile={profile}, {len(items)} experiments, results in {results_dir}", flush=True)
    if args.dry_run:
        tokens: dict[str, int] = {}
        for i, (entry, counts) in enumerate(zip(items, plan(items, results_dir, args.overrides)), 1):
            print(
                f"[{i}/{len(items)}] {entry.name} (task={entry.task}): {counts['jobs']} runs = "
                f"{counts['new']} distinct ({counts['finished']} finished) + {counts['shared']} shared with earlier entries"
            )
            args_ = ["run", *entry.args(results_dir, args.overrides)]
            print("  $ python -m retrobench " + " ".join(_quote(a) for a in args_))
            for model, n in counts["tokens"].items():
                tokens[model] = tokens.get(model, 0) + n
        print("\n".join(gpu_time_lines(tokens, measured_throughput())))
        return 0

    started = time.perf_counter()
    failed = []
    for i, entry in enumerate(items, 1):
        try:
            code = run_entry(entry, i, len(items), results_dir, args.overrides, started)
        except KeyboardInterrupt:
            code = 130
        if code == 130:  # interrupted: finished runs and samples are kept; the same command resumes
            print("reproduce: interrupted; rerun the same command to resume", flush=True)
            return 130
        if code != 0:
            failed.append(entry.name)
    code = 0
    if not args.no_report:
        code = report(results_dir)
        if code != 0:
            print(f"report: FAILED (exit {code})", flush=True)
    print(
        f"reproduce: {len(items) - len(failed)}/{len(items)} experiments ok in {_fmt(time.perf_counter() - started)}"
        + (f"; failed: {', '.join(failed)} (rerun the same command to retry them)" if failed else ""),
        flush=True,
    )
    return 1 if failed or code else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
