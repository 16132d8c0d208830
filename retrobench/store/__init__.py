"""The result store: where runs are written and how they are read back.

- :mod:`~retrobench.store.results` — run folders named by the config hash (``config.yaml``,
  ``samples.jsonl``, ``metrics.json``, ``env.json``): writing them, provenance, resuming.
- :mod:`~retrobench.store.tables` — the one reader: :func:`load_runs` (one row per finished run)
  and :func:`load_samples` (one row per sample), re-exported here.
- :mod:`~retrobench.store.metrics` — per-sample scores to per-run metrics, bootstrap CIs, paired
  differences.

The store imports nothing of the engine, the run layer, the drivers or the report (provenance asks
the kernels which backend ``auto`` picks); everything else reads and writes results through it.
"""

from retrobench.store.tables import load_runs, load_samples

__all__ = ["load_runs", "load_samples"]
