"""Alias kept for one release: ``python -m retrobench.bench`` runs :mod:`retrobench.drivers.bench`."""

from retrobench.drivers.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
