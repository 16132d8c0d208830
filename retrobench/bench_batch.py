"""Alias kept for one release: ``python -m retrobench.bench_batch`` runs :mod:`retrobench.drivers.bench_batch`."""

from retrobench.drivers.bench_batch import main

if __name__ == "__main__":
    raise SystemExit(main())
