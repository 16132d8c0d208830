"""Tables, paired comparisons and the written report over the result store.

``python -m retrobench report`` calls :func:`write_report`, which reads ``<results_dir>/runs/``
(and ``<results_dir>/bench/*.csv`` if present) and writes ``<out>/report.md`` with one CSV per
table under ``<out>/tables/`` and PNG plots (:mod:`retrobench.report.plots`) under ``<out>/plots/``.
It never runs a model and never invents a number: a section whose runs are absent says
"no runs".

The building blocks are pure functions over pandas frames, for notebooks as much as for the
report:

- :func:`runs_table` — one row per finished run: run hash, model, method, ``label`` (method plus
  the settings that distinguish its runs, e.g. ``retro(w=2)``), base, window, budget (fraction
  and tokens), every other method setting, task, dataset, num_questions, ``task.*`` settings,
  ``engine.*`` settings, seed, backend, device, ``env.*`` provenance and every metric of
  ``metrics.json`` (wall time included).
- :func:`samples_table` — one row per sample with the same run columns plus the sample's score
  keys (``accuracy``, ``nll_ratio_bucket_3``, ``top1_agreement``...) and stats (``exposure``,
  ``attended_kv``...), unprefixed.
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

from retrobench.report.common import BASES, PERCENT
from retrobench.report.common import METHOD_ORDER as METHOD_ORDER  # public, not in __all__ (as before)
from retrobench.report.load import (
    KEY_COLUMNS,
    is_latency_frame,
    read_bench,
    runs_latency,
    runs_table,
    samples_table,
)
from retrobench.report.markdown import cell, pivot_cells, to_markdown
from retrobench.report.paper import paper_table
from retrobench.report.stats import latency_overhead, paired, paired_vs_base, select, summary
from retrobench.report.write import log_run_to_wandb, run_figures, write_report

__all__ = [
    "BASES",
    "KEY_COLUMNS",
    "PERCENT",
    "cell",
    "is_latency_frame",
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
