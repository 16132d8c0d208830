"""Alias kept for one release: ``python -m retrobench.bench_cli`` runs :mod:`retrobench.drivers.bench_cli`."""

from retrobench.drivers.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
