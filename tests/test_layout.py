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


def test_every_task_module_is_a_configured_task_or_a_declared_helper() -> None:
    """A module in tasks/ is either the target of a conf/task YAML or listed in tasks.HELPERS."""
    from omegaconf import OmegaConf

    from retrobench.tasks import HELPERS

    targets = {str(OmegaConf.load(p)["_target_"]).split(".")[2] for p in (ROOT / "conf" / "task").glob("*.yaml")}
    modules = {p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    assert modules - targets - set(HELPERS) == set(), "a tasks/ module without a config: add conf/task/<name>.yaml"
    assert set(HELPERS) <= modules and not set(HELPERS) & targets
