"""Starting runs from command-line overrides: the checks before Hydra composes, and the Hydra app.

``retrobench run`` (the CLI) and ``retrobench reproduce`` (a driver) both start runs here:
:func:`prepare_run` turns the one-key budget forms into the long form and checks group choices,
``results_dir``, method sweeps and the composition, each failure as one error line naming the key
and its allowed values; :func:`launch` hands the overrides to a ``@hydra.main`` application whose
job is :func:`retrobench.runner.run.main` (one config -> one run folder, ``results.run_dir(cfg)``),
so every Hydra feature keeps working (``-m`` multirun, launchers, ``--cfg job``, ``--help``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from retrobench.conf import conf_dir

#: Config groups a user picks from on the command line (``<group>=<name>``), in listing order.
GROUPS = ("model", "method", "task", "engine", "logger", "experiment", "sweep")


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


def launch(overrides: list[str]) -> None:
    """Run the Hydra application on ``overrides`` (one run, or a multirun with ``-m``); Hydra's own
    exits (a failed job, ``--help``) pass through as ``SystemExit``."""
    import hydra
    from omegaconf import DictConfig

    from retrobench.runner import run

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        run.main(cfg)

    sys.argv = [sys.argv[0], *overrides]
    app()

__all__ = [
    "GROUPS",
    "check_composition",
    "check_group_choices",
    "check_method_sweep",
    "check_results_dir",
    "group_options",
    "launch",
    "normalize_budget",
    "prepare_run",
]
