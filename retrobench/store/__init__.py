"""The result store: where runs are written and how they are read back.

- :mod:`~retrobench.store.results` — run folders named by the config hash (``config.yaml``,
  ``samples.jsonl``, ``metrics.json``, ``env.json``), provenance, and the one reader of finished
  runs, :func:`~retrobench.store.results.load_runs` / ``load_samples``.
- :mod:`~retrobench.store.metrics` — per-sample scores to per-run metrics, bootstrap CIs, paired
  differences.

The store imports nothing of the engine, the drivers or the report (provenance asks the kernels for
the backend and :mod:`retrobench.runner.gpus` for the GPU); everything else reads results through it.
"""
