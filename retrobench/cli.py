"""Command-line entry point: ``python -m retrobench <command>`` and the ``retrobench`` script.

Commands: ``run``, ``list``, ``report``, ``reproduce``, ``bench``, ``study`` (``--help`` lists them).

``run`` hands everything after the subcommand to a ``@hydra.main`` application, so every Hydra
feature keeps working (``-m`` multirun, ``--cfg job``, ``--help``, ``experiment=``/``sweep=``).
The config directory is found through the installed package (``retrobench.conf``), so the
command works from any working directory.

Before Hydra composes, group choices on the command line (``method=foo``) are checked against
the YAML files present, so a typo fails with one line naming the allowed values instead of
Hydra's multi-line report (:func:`retrobench.runner.launch.prepare_run`, shared with
``reproduce``). ``list`` prints what each group offers, with the first comment line of each YAML
as its description. ``report`` writes the markdown/CSV/PNG report of a result store
(:func:`retrobench.report.write_report`); it reads files only and never loads a model.
``reproduce``, ``bench`` and ``study`` hand their arguments to a driver of :mod:`retrobench.drivers`
(the same programs as ``python -m retrobench.reproduce`` etc., which stay as aliases).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from retrobench.conf import conf_dir  # noqa: F401 - the one config-folder finder, re-exported here
from retrobench.runner.launch import GROUPS, group_options, launch, normalize_budget, prepare_run  # noqa: F401

USAGE = """\
usage: python -m retrobench <command> [options]     (or: retrobench <command> ...)

commands:
  run [OVERRIDES...]   run one experiment (Hydra app: any key=value override, -m for sweeps)
  list                 list the models, methods, tasks, engines, loggers, experiments and sweeps
  report [--results-dir DIR] [--out DIR] [--bench-dir DIR]
                       write DIR/report/report.md (+ tables/*.csv, plots/*.png) from the result
                       store: means with 95% CIs, paired retro - base differences, the paper's
                       numbers beside ours (`report --help` for details)
  reproduce [--profile small|paper|tiny] [--only NAME,...] [--dry-run] ...
                       the paper's tables and figures as resumable runs, then the report
                       (conf/reproduce.yaml; `reproduce --help`)
  bench [KIND] [ARGS...]
                       benchmarks -> results/bench/; KIND: decode (the triton decode step vs its
                       floor), engine (engine vs transformers generate), cli, batch, grader;
                       default: decode on a GPU, engine on CPU (`bench KIND --help`)
  study {mass,retro,table} [ARGS...]
                       studies outside the run store: attention mass per method, retro vs quest,
                       one table of ppl/fidelity runs (`study --help`)
  --help, -h           show this message (`run --help` shows Hydra's help and the config)

examples:
  python -m retrobench run                                  # smollm2_135m, method=retro, task=longgenbench
  python -m retrobench run method=quest method.budget=2048  # a budget in tokens (0.15: a fraction)
  python -m retrobench run model=tiny_random task.num_samples=2
  python -m retrobench run experiment=smoke                 # seconds-long end-to-end check
  python -m retrobench run -m seed=0,1,2                    # multirun over seeds
  python -m retrobench run sweep=seeds                      # the same, as a sweep config
  python -m retrobench run --cfg job                        # print the composed config, run nothing
  python -m retrobench run overwrite=true                   # rerun a finished run
  python -m retrobench list
  python -m retrobench report                               # results/ -> results/report/report.md
  python -m retrobench reproduce --profile small --dry-run  # what reproducing would run
  python -m retrobench bench decode --smoke --out /tmp/b    # toy sizes (TRITON_INTERPRET=1 on CPU)

Results go to <results_dir>/runs/<hash>/ (config.yaml, env.json, samples.jsonl, metrics.json);
a finished run is skipped, a killed one resumes. Read them with retrobench.store.load_runs() (one row
per run) and load_samples() (one row per sample).
"""


def list_configs() -> None:
    """Print every group's options with their descriptions."""
    root = conf_dir()
    for group in GROUPS:
        options = group_options(group, root)
        print(f"{group}s:" if not group.endswith("s") else f"{group}:")
        if not options:
            print("  (none)")
        width = max((len(n) for n in options), default=0)
        for name, description in options.items():
            print(f"  {name:<{width}}  {description}".rstrip())
        print()
    print("use: python -m retrobench run <group>=<name> [key=value ...]")


REPORT_HELP = """\
usage: python -m retrobench report [--results-dir DIR] [--out DIR] [--bench-dir DIR]
       (key=value also works: results_dir=DIR out=DIR bench_dir=DIR)

Reads the finished runs under DIR/runs/ (and the benchmark CSVs under DIR/bench/) and writes
  OUT/report.md        markdown tables: mean [95% bootstrap CI] over samples, paired retro - base
                       differences on the same samples, the paper's numbers beside ours and the gap
  OUT/tables/*.csv     one CSV per table (full precision)
  OUT/plots/*.png      accuracy vs budget / window, exposure vs window / accuracy, perplexity
                       ratio over position, latency vs context (retrobench.report.plots)
Sections without runs say "no runs"; nothing is computed that the store does not hold.

options:
  --results-dir DIR    result store root (default: results)
  --out DIR            output folder (default: DIR/report); its tables/ and plots/ are replaced
  --bench-dir DIR      benchmark CSV folder (default: DIR/bench)
  -h, --help           show this message
"""


def report_main(args: list[str]) -> int:
    """``report``: parse ``--results-dir/--out/--bench-dir`` (or ``key=value``) and write the report."""
    options = {"results_dir": "results", "out": None, "bench_dir": None}
    flags = {"--results-dir": "results_dir", "--out": "out", "--bench-dir": "bench_dir"}
    rest = list(args)
    while rest:
        item = rest.pop(0)
        if item in ("-h", "--help"):
            print(REPORT_HELP, end="")
            return 0
        name, sep, value = item.partition("=")
        if name in flags:
            if not sep:
                if not rest:
                    print(f"error: report {name} needs a value", file=sys.stderr)
                    return 2
                value = rest.pop(0)
            options[flags[name]] = value
        elif sep and name in options:
            options[name] = value
        else:
            allowed = ", ".join([*flags, *(f"{k}=" for k in options)])
            print(f"error: report: unknown argument {item!r}; allowed: {allowed}", file=sys.stderr)
            return 2
    root = Path(str(options["results_dir"])).expanduser()
    if not root.is_dir():
        print(f"error: report --results-dir {root} does not exist (no result store there)", file=sys.stderr)
        return 2
    from retrobench.report import write_report

    path = write_report(root, options["out"], options["bench_dir"])
    print(f"report: {path}")
    return 0


#: ``bench <KIND>`` -> the module of :mod:`retrobench.drivers` that runs it.
BENCHES = {"decode": "bench_decode", "engine": "bench", "cli": "bench_cli", "batch": "bench_batch", "grader": "bench_grader",
           "profile": "bench_profile", "kernels": "bench_kernels"}  # fmt: skip

BENCH_HELP = """\
usage: python -m retrobench bench [KIND] [ARGS...]     (`bench KIND --help`: that benchmark's options)

kinds (each writes CSV + markdown under results/bench/ unless --out says otherwise):
  decode    the triton decode step vs its floor, per method and context (GPU; --smoke on CPU)
  engine    the engine vs transformers generate on one prompt (CPU or GPU)
  cli       experiment=latency through the CLI, per method and backend (GPU)
  batch     a batched generation run vs batch 1 (GPU)
  grader    the LiveCodeBench sandbox grader's throughput
  profile   kernel-time sums and counts of one decode step (or prefill) per method (GPU)
  kernels   launch settings of the selection and attention kernels, swept and timed (GPU; --smoke on CPU)
without KIND: decode on a GPU, engine on CPU (as `make bench`)
"""


def _driver(module: str, args: list[str]) -> int:
    """Run ``retrobench.drivers.<module>.main(args)``; a driver returning None succeeded."""
    code = importlib.import_module(f"retrobench.drivers.{module}").main(args)
    return 0 if code is None else int(code)


def bench_main(args: list[str]) -> int:
    """``bench [KIND] [ARGS...]``: one benchmark of :data:`BENCHES` (default as ``make bench``)."""
    if args and args[0] in ("-h", "--help"):
        print(BENCH_HELP, end="")
        return 0
    if args and not args[0].startswith("-"):
        kind, rest = args[0], args[1:]
        if kind not in BENCHES:
            print(f"error: bench {kind!r} is not a benchmark; allowed: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
    else:
        import torch

        kind, rest = ("decode" if torch.cuda.is_available() else "engine"), args
    return _driver(BENCHES[kind], rest)


#: Commands that hand everything after them to a driver (``bench`` picks its driver itself).
DRIVERS = {"reproduce": "reproduce", "study": "studies"}
COMMANDS = ("run", "list", "report", "reproduce", "bench", "study")


def main(argv: list[str] | None = None) -> int:
    """Dispatch a subcommand; returns the exit code (Hydra's own exits pass through)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command == "list":
        list_configs()
        return 0
    if command == "report":
        return report_main(rest)
    if command == "bench":
        return bench_main(rest)
    if command in DRIVERS:
        return _driver(DRIVERS[command], rest)
    if command == "run":
        rest, error = prepare_run(rest)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        launch(rest)
        return 0
    print(f"error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}, --help", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
