"""Layout guards: ``methods``/``tasks``/``kernels`` live inside the ``retrobench`` namespace.

``kernels`` is also the name of a real PyPI package that transformers probes for, so our code
must never import a top-level ``methods``, ``tasks`` or ``kernels`` module, and transformers'
probe must answer the same with our checkout on ``sys.path`` as without it.
"""

from __future__ import annotations

import ast
import os
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
