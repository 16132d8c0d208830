"""Tables, paired comparisons and the written report over the result store.

``python -m retrobench report`` calls :func:`write_report`, which reads ``<results_dir>/runs/``
(and ``<results_dir>/bench/*.csv`` if present) and writes ``<out>/report.md`` with one CSV per
table under ``<out>/tables/`` and PNG plots (:mod:`retrobench.report.plots`) under ``<out>/plots/``.
It never runs a model and never invents a number: a section whose runs are absent says
"no runs".

The building blocks are pure functions over pandas frames, for notebooks as much as for the
report:

- :func:`load_runs` / :func:`load_samples` — the store's one reader (:mod:`retrobench.store.tables`,
  re-exported here; ``runs_table`` / ``samples_table`` are the same functions under their former
  names): one row per finished run / per sample.
- :func:`summary` — n, mean, std and percentile-bootstrap 95% CI per group
  (:func:`retrobench.store.metrics.bootstrap_ci` of the sorted values, so the CI does not depend on the
  order runs and samples were read in).
- :func:`paired` — mean difference ``a - b`` and its CI over matched ``(id, seed)`` samples
  (:func:`retrobench.store.metrics.paired_difference`).
- :func:`paper_table` — our means (or paired differences) beside the paper's numbers
  (:mod:`retrobench.report.paper_numbers`) and the gap.

Conventions: accuracy-like metrics (:data:`PERCENT`) are stored as fractions and shown in
percent (differences in percentage points, ``pp``); CIs use 2000 resamples with seed 0, so a
report is reproducible bit for bit from the same store.

Modules, by role: :mod:`~retrobench.report.load` (the store as frames),
:mod:`~retrobench.report.stats` (selection, summaries, paired differences),
:mod:`~retrobench.report.paper` (the paper comparison), :mod:`~retrobench.report.markdown`
(rendering), :mod:`~retrobench.report.sections` and :mod:`~retrobench.report.write` (the written
report, and the per-run figures for wandb), :mod:`~retrobench.report.common` (shared conventions).
Every public name is re-exported here: import from ``retrobench.report``.
"""

from __future__ import annotations

from retrobench.report.common import PERCENT
from retrobench.report.common import METHOD_ORDER as METHOD_ORDER  # public, not in __all__ (as before)
from retrobench.report.load import is_latency_frame, read_bench, runs_latency
from retrobench.report.markdown import cell, pivot_cells, to_markdown
from retrobench.report.paper import paper_table
from retrobench.report.stats import latency_overhead, paired, paired_vs_base, select, summary
from retrobench.report.write import log_run_to_wandb, run_figures, write_report
from retrobench.store.tables import KEY_COLUMNS, load_runs, load_samples

#: The store's one reader under its former report names (kept for one release): the same functions.
runs_table, samples_table = load_runs, load_samples

__all__ = [
    "KEY_COLUMNS",
    "PERCENT",
    "cell",
    "is_latency_frame",
    "load_runs",
    "load_samples",
    "latency_overhead",
    "log_run_to_wandb",
    "paired",
    "paired_vs_base",
    "paper_table",
    "pivot_cells",
    "read_bench",
    "run_figures",
    "runs_latency",
    "runs_table",
    "samples_table",
    "select",
    "summary",
    "to_markdown",
    "write_report",
]
