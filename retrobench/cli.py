"""Command-line entry point: ``python -m retrobench <command>`` and the ``retrobench`` script.

Commands: ``run``, ``list``, ``report``, ``reproduce``, ``bench``, ``study`` (``--help`` lists them).

``run`` hands everything after the subcommand to a ``@hydra.main`` application, so every Hydra
feature keeps working (``-m`` multirun, ``--cfg job``, ``--help``, ``experiment=``/``sweep=``).
The config directory is found through the installed package (``retrobench.conf``), so the
command works from any working directory.

Before Hydra composes, group choices on the command line (``method=foo``) are checked against
the YAML files present, so a typo fails with one line naming the allowed values instead of
Hydra's multi-line report. ``list`` prints what each group offers, with the first comment line
of each YAML as its description. ``report`` writes the markdown/CSV/PNG report of a result store
(:func:`retrobench.report.write_report`); it reads files only and never loads a model.
``reproduce``, ``bench`` and ``study`` hand their arguments to a driver of :mod:`retrobench.drivers`
(the same programs as ``python -m retrobench.reproduce`` etc., which stay as aliases).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from retrobench.conf import conf_dir  # the one config-folder finder, re-exported here

#: Config groups a user picks from on the command line (``<group>=<name>``), in listing order.
GROUPS = ("model", "method", "task", "engine", "logger", "experiment", "sweep")

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


def group_options(group: str, root: Path | None = None) -> dict[str, str]:
    """``{name: description}`` of the YAML files of a config group (description: first comment line)."""
    folder = (root or conf_dir()) / group
    options = {}
    for path in sorted(folder.glob("*.yaml")):
        description = ""
        for line in path.read_text().splitlines():
            text = line.strip()
            if not text.startswith("#"):
                break
            text = text.lstrip("#").strip()
            if text and not text.startswith("@"):
                description = text
                break
        options[path.stem] = description
    return options


_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?(?P<key>[A-Za-z_][\w/]*)(?:@[\w.]+)?=(?P<value>.*)$")


def check_group_choices(overrides: list[str], root: Path | None = None) -> str | None:
    """The first invalid group choice among ``overrides`` as an error message, or None.

    Understands plain values, comma lists (``method=a,b``) and ``choice(a,b)`` sweeps; values
    with interpolations, globs or ranges are left to Hydra.
    """
    for item in overrides:
        match = _OVERRIDE.match(item)
        if not match or match.group("key") not in GROUPS:
            continue
        group, value = match.group("key"), match.group("value").strip()
        sweep = re.fullmatch(r"choice\((.*)\)", value)
        if sweep:
            value = sweep.group(1)
        if value in ("", "null") or any(c in value for c in "${}*[]()"):
            continue
        options = group_options(group, root)
        for name in (v.strip().strip("'\"") for v in value.split(",")):
            if name and name not in options:
                article = "an" if group[0] in "aeiou" else "a"
                allowed = ", ".join(options) or "(none)"
                return f"{group}={name} is not {article} {group}; allowed: {allowed}"
    return None


def check_composition(overrides: list[str], root: Path | None = None) -> str | None:
    """Compose the config once as Hydra would; a failure becomes one error line (else None).

    Skipped when Hydra flags (``-m``, ``--cfg`` ...) are present: Hydra handles those itself.
    An override of a key that does not exist names the keys that do.
    """
    if any(arg.startswith("-") for arg in overrides):
        return None
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    user = [o for o in overrides if not re.match(r"^[+~]*hydra[./]", o)]
    root = root or conf_dir()
    try:
        with initialize_config_dir(str(root), version_base="1.3"):
            compose("config", overrides=user)
        return None
    except Exception as exc:  # noqa: BLE001 - hydra and omegaconf raise many types; all mean a bad override
        text = str(exc)
    missing = re.search(r"Could not override '([\w.]+)'", text)
    if missing and "To append to your config" in text:
        key = missing.group(1)
        parent = key.rpartition(".")[0]
        rest = [o for o in user if not o.startswith(key + "=")]
        with initialize_config_dir(str(root), version_base="1.3"):
            node = compose("config", overrides=rest)
        node = OmegaConf.select(node, parent) if parent else node
        allowed = ", ".join(k for k in (node.keys() if hasattr(node, "keys") else []) if k != "_target_")
        choice = (  # the last choice of the group wins, as in Hydra
            next((o.split("=", 1)[1] for o in reversed(user) if o.startswith(parent + "=")), None) if parent else None
        )
        where = f"{parent}={choice}" if choice else (parent or "the config")
        return f"{key} is not a key of {where}; allowed: {allowed} (add a new key with +{key}=...)"
    return " ".join(
        text.replace(
            "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", ""
        ).split()
    )


_BUDGET = re.compile(r"^(?P<prefix>\+\+|\+)?method\.budget(?P<sub>\.tokens|\.fraction)?=(?P<value>.*)$")


def _number_kind(text: str) -> str | None:
    """``tokens`` for an integer, ``fraction`` for a decimal number, None otherwise."""
    if re.fullmatch(r"\d+", text):
        return "tokens"
    if re.fullmatch(r"\d*\.\d+(e-?\d+)?|\d+e-\d+", text):
        return "fraction"
    return None


def normalize_budget(overrides: list[str]) -> tuple[list[str], str | None]:
    """One key sets a budget: ``method.budget=2048`` (tokens), ``method.budget=0.15`` (a fraction), and
    ``method.budget.tokens=N`` / ``method.budget.fraction=b`` alone null the other key. Returns the
    overrides in the long form (the same run, the same hash as spelling both keys) or an error."""
    out, given = [], {"tokens": False, "fraction": False}
    for item in overrides:
        match = _BUDGET.match(item)
        if not match:
            out.append(item)
            continue
        sub, value = match.group("sub"), match.group("value").strip()
        if sub:
            given[sub[1:]] = True
            out.append(item)
            continue
        values = [v.strip() for v in value.split(",")]
        kinds = {_number_kind(v) for v in values}
        if None in kinds or len(kinds) != 1:
            return overrides, (
                f"method.budget={value}: give token counts (method.budget=2048) or fractions of the context "
                "(method.budget=0.15), not both in one sweep; or set method.budget.tokens / method.budget.fraction"
            )
        (kind,) = kinds
        other = "fraction" if kind == "tokens" else "tokens"
        out += [f"method.budget.{kind}={value}", f"method.budget.{other}=null"]
        given[kind] = given[other] = True
    for kind, other in (("tokens", "fraction"), ("fraction", "tokens")):
        set_here = any(o.startswith(f"method.budget.{kind}=") and not o.endswith("=null") for o in out)
        if set_here and not given[other]:
            out.append(f"method.budget.{other}=null")
    return out, None


def check_results_dir(overrides: list[str], root: Path | None = None) -> str | None:
    """``results_dir`` must be a folder this user can create and write, checked before Hydra creates
    anything in it (its logs go to ``<results_dir>/hydra/``). Nothing is left behind."""
    import os
    import tempfile

    value = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("results_dir=")), None)
    if value is None:
        from omegaconf import OmegaConf

        value = str(OmegaConf.load((root or conf_dir()) / "config.yaml").get("results_dir", "results"))
    if any(c in value for c in "${}"):
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"results_dir={value} cannot be a folder: {existing} is a file; choose a folder (results_dir=<dir>)"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".retrobench-check-", dir=existing))
    except OSError as exc:
        return (
            f"results_dir={value} cannot be created or written: {exc.strerror} in {existing}; "
            "choose a writable folder (results_dir=<dir>)"
        )
    return None


def check_method_sweep(overrides: list[str], root: Path | None = None) -> str | None:
    """A method setting with several methods (``-m method=full,quest method.budget.tokens=32``) must
    exist in every one of them: said in one line before any run starts, instead of one failed job."""
    from omegaconf import OmegaConf

    methods = next((o.split("=", 1)[1] for o in reversed(overrides) if re.match(r"^method=", o)), None)
    keys = [o.split("=", 1)[0] for o in overrides if re.match(r"^method\.[\w.]+=", o)]
    if not methods or not keys or any(c in methods for c in "${}*()"):
        return None
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if len(names) < 2:
        return None  # one method: check_composition names the key and its allowed values
    folder = (root or conf_dir()) / "method"
    for key in keys:
        path = key.split(".")[1:]
        lacking = [n for n in names if (folder / f"{n}.yaml").is_file() and path[0] not in OmegaConf.load(folder / f"{n}.yaml")]
        if lacking:
            having = [n for n in names if n not in lacking]
            return (
                f"{key} does not apply to method={','.join(lacking)} (it has no {path[0]}); sweep it over methods that "
                f"have one ({','.join(having) or 'none'}) and run {','.join(lacking)} separately"
            )
    return None


def prepare_run(overrides: list[str]) -> tuple[list[str], str | None]:
    """The ``run`` overrides after the one-key budget forms, or the first problem as one error line."""
    overrides, error = normalize_budget(overrides)
    return overrides, (
        error
        or check_group_choices(overrides)
        or check_results_dir(overrides)
        or check_method_sweep(overrides)
        or check_composition(overrides)
    )


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


def _run_hydra(overrides: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from retrobench.runner import run

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        run.main(cfg)

    sys.argv = [sys.argv[0], *overrides]
    app()


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
BENCHES = {"decode": "bench_decode", "engine": "bench", "cli": "bench_cli", "batch": "bench_batch", "grader": "bench_grader"}

BENCH_HELP = """\
usage: python -m retrobench bench [KIND] [ARGS...]     (`bench KIND --help`: that benchmark's options)

kinds (each writes CSV + markdown under results/bench/ unless --out says otherwise):
  decode    the triton decode step vs its floor, per method and context (GPU; --smoke on CPU)
  engine    the engine vs transformers generate on one prompt (CPU or GPU)
  cli       experiment=latency through the CLI, per method and backend (GPU)
  batch     a batched generation run vs batch 1 (GPU)
  grader    the LiveCodeBench sandbox grader's throughput
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
        _run_hydra(rest)
        return 0
    print(f"error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}, --help", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
