"""retrobench's Hydra configs: this folder, installed as ``retrobench.conf``.

:func:`conf_dir` is the one way every part of retrobench (CLI, drivers, tasks, benchmarks) finds
it, in a clone or an installed wheel alike.
"""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """The config folder (``config.yaml`` and the groups ``model/``, ``method/``, ``task/``, ...)."""
    return Path(__file__).resolve().parent


__all__ = ["conf_dir"]
