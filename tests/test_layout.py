"""Layout guards: ``methods``/``tasks``/``kernels`` live inside the ``retrobench`` namespace.

``kernels`` is also the name of a real PyPI package that transformers probes for, so our code
must never import a top-level ``methods``, ``tasks`` or ``kernels`` module, and transformers'
probe must answer the same with our checkout on ``sys.path`` as without it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"methods", "tasks", "kernels", "conf"}
SKIP = {".venv", ".git", "build", "dist", "results", ".pytest_cache", ".hypothesis", "node_modules"}


def _python_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*.py"):
        parts = set(path.relative_to(ROOT).parts)
        if not parts & SKIP and not any(p.endswith(".egg-info") for p in parts):
            files.append(path)
    return files


def test_no_top_level_imports_of_our_folders() -> None:
    offenders = []
    files = _python_files()
    assert any(p.parts[-2:] == ("retrobench", "cli.py") for p in files)
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
    assert not offenders, "import these through retrobench.<pkg> instead:\n" + "\n".join(offenders)


PROBE = (
    "from transformers.utils.import_utils import is_kernels_available, _is_package_available; "
    "print(is_kernels_available(), _is_package_available('kernels')[0])"
)


def _probe(cwd: Path, **env_extra: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update({k: v for k, v in env_extra.items() if v is not None})
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_transformers_kernels_probe_unaffected_by_checkout(tmp_path: Path) -> None:
    outside = _probe(tmp_path)
    # transformers' probe, with the repository root first on sys.path
    with_root = _probe(ROOT, PYTHONPATH=str(ROOT))
    assert with_root[0] == outside[0], "is_kernels_available() changes with the checkout on sys.path"
    # how `make` starts Python (PYTHONSAFEPATH=1: the working directory is not put on sys.path)
    as_make = _probe(ROOT, PYTHONSAFEPATH="1")
    assert as_make == outside, "the checkout's kernels/ folder is visible as a top-level package"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def test_kernels_import_nothing_of_the_methods_or_the_engine() -> None:
    """``kernels/`` is the seam between methods and hardware: it depends on torch and triton only."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in sorted((ROOT / "kernels").glob("*.py"))
        for line, name in _imports(path)
        if name.startswith("retrobench") and not name.startswith("retrobench.kernels")
    ]
    assert not offenders, "kernels/ must not import the methods, the engine or the drivers:\n" + "\n".join(offenders)


METHOD_NAMES = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def test_the_engine_names_no_method() -> None:
    """Everything method-specific lives behind the method contract: no method name, module or class
    appears in retrobench/engine/ (as an import, a string, or an identifier)."""
    distinctive = [m for m in METHOD_NAMES if m != "full"]  # "full" is also a torch function name
    offenders = []
    for path in sorted((ROOT / "retrobench" / "engine").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words = set(node.value.lower().replace(".", " ").replace("=", " ").split())
                offenders += [f"{where}: string {node.value!r}" for m in METHOD_NAMES if m in words]
            elif isinstance(node, (ast.Name, ast.Attribute, ast.FunctionDef, ast.ClassDef, ast.arg)):
                ident = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None) \
                    or getattr(node, "arg", "")  # fmt: skip
                words = set(re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", ident).lower().split("_"))
                offenders += [f"{where}: identifier {ident}" for m in distinctive if m in words]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                offenders += [f"{where}: import {n}" for n in names
                              if n.startswith("retrobench.methods.") and n.split(".")[2] in METHOD_NAMES]  # fmt: skip
    assert METHOD_NAMES and not offenders, "the engine names a method:\n" + "\n".join(offenders)


def test_every_task_module_is_a_configured_task_and_helpers_live_in_lib() -> None:
    """A module directly in tasks/ is the target of a conf/task YAML (or the contract ``base`` and the
    shared ``graders``, tasks.HELPERS); the helpers of particular tasks live in tasks/lib/."""
    from omegaconf import OmegaConf

    from retrobench.tasks import HELPERS

    targets = {str(OmegaConf.load(p)["_target_"]).split(".")[2] for p in (ROOT / "conf" / "task").glob("*.yaml")}
    modules = {p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    assert modules - targets - set(HELPERS) == set(), "a tasks/ module without a config: add conf/task/<name>.yaml"
    assert set(HELPERS) <= modules and not set(HELPERS) & targets
    assert "lib" not in targets and "lib" not in modules
    lib = {p.stem for p in (ROOT / "tasks" / "lib").glob("*.py")}
    assert {"__init__", "sandbox", "livecodebench", "longgenbench_data"} <= lib
    doc = ast.get_docstring(ast.parse((ROOT / "tasks" / "lib" / "__init__.py").read_text()))
    assert doc and len(doc) > 80, "tasks/lib/__init__.py needs a docstring saying what it holds"


def test_every_package_folder_is_installed() -> None:
    """Every folder with an ``__init__.py`` under an installed folder is in pyproject.toml's ``packages``
    (an editable install finds an unlisted one anyway; a regular install would leave it out)."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = [ROOT / "retrobench", *(ROOT / f for f in FOLDERS.values())]
    found = {_module_name(init) for folder in folders for init in folder.rglob("__init__.py")
             if "__pycache__" not in init.parts}  # fmt: skip
    assert "retrobench.tasks.lib" in found
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


# ---- the package layout: each folder one layer, and which layer may import which ----------------------

#: Where each installed package lives in the checkout (pyproject.toml's package-dir).
FOLDERS = {"retrobench.methods": "methods", "retrobench.tasks": "tasks", "retrobench.kernels": "kernels", "retrobench.conf": "conf"}
#: The subpackages of retrobench/, one layer each (their __init__ docstring says what each owns).
SUBPACKAGES = ("drivers", "runner", "inputs", "store", "report", "engine")
#: What may sit at the top of retrobench/: the CLI, the Python API, and aliases kept for one release.
TOP_MODULES = {"__init__", "__main__", "api", "cli"}
ALIASES = {"reproduce", "studies", "bench", "bench_decode", "bench_cli", "bench_batch", "bench_grader"}

#: Layer -> the layers it must not import (anywhere in the file, lazy imports included).
FORBIDDEN_IMPORTS = {
    "retrobench.methods": ("retrobench.drivers", "retrobench.runner", "retrobench.report", "retrobench.store",
                           "retrobench.inputs", "retrobench.cli", "retrobench.api"),
    "retrobench.tasks": ("retrobench.drivers", "retrobench.runner", "retrobench.report", "retrobench.engine",
                         "retrobench.cli", "retrobench.api"),
    "retrobench.engine": ("retrobench.drivers", "retrobench.runner", "retrobench.report", "retrobench.store",
                          "retrobench.inputs", "retrobench.cli", "retrobench.api"),
    "retrobench.inputs": ("retrobench.drivers", "retrobench.runner", "retrobench.report", "retrobench.store",
                          "retrobench.engine", "retrobench.cli", "retrobench.api"),
    "retrobench.report": ("retrobench.engine", "retrobench.methods", "retrobench.kernels", "retrobench.runner",
                          "retrobench.inputs", "retrobench.drivers", "retrobench.cli", "retrobench.api"),
    "retrobench.store": ("retrobench.engine", "retrobench.methods", "retrobench.tasks", "retrobench.runner",
                         "retrobench.inputs", "retrobench.report", "retrobench.drivers", "retrobench.cli", "retrobench.api"),
    "retrobench.runner": ("retrobench.drivers", "retrobench.cli", "retrobench.api"),
    "retrobench.drivers": ("retrobench.cli", "retrobench.api", "hydra._internal"),
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    top = {v: k for k, v in FOLDERS.items()}.get(rel.parts[0], rel.parts[0])
    parts = [top, *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    """Every module of the installed ``retrobench`` namespace, by dotted name."""
    folders = [ROOT / "retrobench", *(ROOT / f for f in FOLDERS.values())]
    return {_module_name(p): p for folder in folders for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def _resolved_imports(name: str, path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (relative ones made absolute; ``from a import b``
    yields both ``a`` and ``a.b``, since ``b`` may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_subpackage_says_what_it_owns() -> None:
    for sub in SUBPACKAGES:
        init = ROOT / "retrobench" / sub / "__init__.py"
        assert init.is_file(), f"retrobench/{sub}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"retrobench/{sub}/__init__.py needs a docstring saying what the package owns"


def test_the_top_of_the_package_is_the_cli_the_api_and_aliases() -> None:
    """``ls retrobench/`` shows the layers; a module at the top is the CLI, the API, or a
    ``python -m retrobench.<driver>`` alias (a few lines that call the driver's ``main``)."""
    top = {p.stem for p in (ROOT / "retrobench").glob("*.py")}
    assert top - TOP_MODULES - ALIASES == set(), "put new modules in a subpackage (see SUBPACKAGES)"
    for alias in ALIASES & top:
        text = (ROOT / "retrobench" / f"{alias}.py").read_text()
        assert "Alias" in text and len(text.splitlines()) <= 8, f"retrobench/{alias}.py must stay a thin alias"
        assert f"from retrobench.drivers.{alias} import main" in text


def test_layers_import_only_what_they_may() -> None:
    offenders = []
    for name, path in sorted(_package_modules().items()):
        for layer, forbidden in FORBIDDEN_IMPORTS.items():
            if not _within(name, layer):
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {layer} imports {mod}"
                          for line, mod in _resolved_imports(name, path) if any(_within(mod, f) for f in forbidden)]  # fmt: skip
    assert not offenders, "an import crosses the layers (tests/test_layout.py FORBIDDEN_IMPORTS):\n" + "\n".join(offenders)


def test_only_the_cli_and_the_aliases_import_the_drivers() -> None:
    allowed = {"retrobench.cli", *(f"retrobench.{a}" for a in ALIASES)}
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: import {mod}"
        for name, path in sorted(_package_modules().items())
        if name not in allowed and not _within(name, "retrobench.drivers")
        for line, mod in _resolved_imports(name, path)
        if _within(mod, "retrobench.drivers")
    ]
    assert not offenders, "drivers are entry points; move what others need into a lower layer:\n" + "\n".join(offenders)


def test_the_old_module_spellings_still_run() -> None:
    """``python -m retrobench.<driver>`` (Makefile, README, GPU recipes) reaches the moved driver."""
    procs = {alias: subprocess.Popen([sys.executable, "-m", f"retrobench.{alias}", "--help"], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for alias in sorted(ALIASES)}  # all at once: each start is seconds of imports  # fmt: skip
    for alias, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "usage:" in out, f"python -m retrobench.{alias} --help: {err}"


def test_one_config_error_class() -> None:
    """A bad setting raises :class:`retrobench.conf.ConfigError` wherever it is checked (run, model,
    method, task, engine): one class, so callers catch one thing."""
    from retrobench.conf import ConfigError

    defined = [f"{path.relative_to(ROOT)}: class {node.name}"
               for path in _package_modules().values()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef) and node.name.endswith("ConfigError")]  # fmt: skip
    assert defined == ["conf/__init__.py: class ConfigError"], defined
    from retrobench.methods.base import ConfigError as from_methods
    from retrobench.tasks.base import ConfigError as from_tasks

    assert from_methods is from_tasks is ConfigError


#: Import cycles that exist on purpose, each broken at run time by a lazy import (the engine's own).
KNOWN_CYCLES = [["retrobench.engine.batch", "retrobench.engine.engine"]]


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (lazy imports included). ``from pkg import mod``
    points at ``pkg.mod`` only: a package's ``__init__`` runs before any of its modules anyway."""
    modules = _package_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs | ({base} if len(subs) < len(node.names) else set())
        graph[name] = (deps & modules.keys()) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycles() -> None:
    """No circle of imports (the report's plots -> report -> write -> plots circle is gone)."""
    cycles = [c for c in _cycles(_module_graph()) if c not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_share_only_public_names() -> None:
    """No module imports a ``_private`` name of another (the report did in 12 places): what is shared is public."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}"
        for path in sorted(_package_modules().values())
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrobench")
        for alias in node.names if alias.name.startswith("_")
    ]  # fmt: skip
    assert not offenders, "\n".join(offenders)
