"""An offline long English text that exists on every machine with Python: the standard library's
own documentation (module, class and function docstrings), in a fixed module order.

Used where a real long text is needed without a download (teacher-forced studies, the default
source of perplexity runs). The text depends on the Python version, which provenance records.
"""

from __future__ import annotations

import importlib
import inspect
import sys

# Prose-heavy, import-safe standard-library modules, in a fixed order.
MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "random",
    "re", "string", "textwrap", "typing", "datetime", "decimal", "fractions", "statistics",
    "unittest", "http.client", "email.message", "csv", "sqlite3", "threading", "subprocess",
    "asyncio", "contextlib", "dataclasses", "enum", "heapq", "bisect", "shutil", "tempfile",
    "zipfile", "tarfile", "configparser", "difflib", "pickle", "copy", "pprint", "inspect", "ast",
)  # fmt: skip


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a stripped-down Python may lack a module: skip it, the order stays fixed
        return []
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    return [d.strip() for d in docs if len(d.strip()) > 80]


def stdlib_text(min_chars: int = 200_000) -> str:
    """At least ``min_chars`` characters of standard-library documentation (less if Python has less)."""
    parts: list[str] = []
    total = 0
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            parts.append(doc)
            total += len(doc) + 2
            if total >= min_chars:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


def stdlib_tokens(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of :func:`stdlib_text` under ``tokenizer``."""
    chars = 6 * n_tokens
    while True:
        ids = tokenizer.encode(stdlib_text(chars), add_special_tokens=False)
        if len(ids) >= n_tokens or chars > 40_000_000:
            if len(ids) < n_tokens:
                raise ValueError(f"the standard library documentation has only {len(ids)} tokens, {n_tokens} needed")
            return ids[:n_tokens]
        chars *= 2


def provenance() -> str:
    return f"Python {sys.version.split()[0]} standard-library docstrings"
