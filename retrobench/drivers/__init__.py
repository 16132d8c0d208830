"""Drivers: the programs a person runs, each a thin layer over the run layer and the store.

- :mod:`~retrobench.drivers.reproduce` — the paper's tables and figures (``retrobench reproduce``,
  ``make reproduce``): plans runs from ``conf/reproduce.yaml``, runs the missing ones, writes the report.
- :mod:`~retrobench.drivers.studies` — measurements outside the run store (``retrobench study``).
- :mod:`~retrobench.drivers.bench`, :mod:`~retrobench.drivers.bench_decode`,
  :mod:`~retrobench.drivers.bench_cli`, :mod:`~retrobench.drivers.bench_batch`,
  :mod:`~retrobench.drivers.bench_grader` — benchmarks writing ``results/bench/`` (``retrobench bench``).

Drivers import the run layer, the inputs and the store; nothing imports a driver except the CLI
(``retrobench/cli.py``) and the ``python -m retrobench.<driver>`` aliases kept for one release.
"""
