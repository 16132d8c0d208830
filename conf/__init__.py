"""retrobench's Hydra configs: this folder, installed as ``retrobench.conf``.

:func:`conf_dir` is the one way every part of retrobench (CLI, drivers, tasks, benchmarks) finds
it, in a clone or an installed wheel alike. :class:`ConfigError` is the one error a bad setting
raises, wherever it is checked (run, model, method, task or engine settings).
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and the allowed values."""


def conf_dir() -> Path:
    """The config folder (``config.yaml`` and the groups ``model/``, ``method/``, ``task/``, ...)."""
    return Path(__file__).resolve().parent


__all__ = ["ConfigError", "conf_dir"]
