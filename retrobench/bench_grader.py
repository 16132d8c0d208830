"""Alias kept for one release: ``python -m retrobench.bench_grader`` runs :mod:`retrobench.drivers.bench_grader`."""

from retrobench.drivers.bench_grader import main

if __name__ == "__main__":
    raise SystemExit(main())
