"""Alias kept for one release: ``python -m retrobench.reproduce`` runs :mod:`retrobench.drivers.reproduce`."""

from retrobench.drivers.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
