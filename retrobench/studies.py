"""Alias kept for one release: ``python -m retrobench.studies`` runs :mod:`retrobench.drivers.studies`."""

from retrobench.drivers.studies import main

if __name__ == "__main__":
    raise SystemExit(main())
