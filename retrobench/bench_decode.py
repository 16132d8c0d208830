"""Alias kept for one release: ``python -m retrobench.bench_decode`` runs :mod:`retrobench.drivers.bench_decode`."""

from retrobench.drivers.bench_decode import main

if __name__ == "__main__":
    raise SystemExit(main())
