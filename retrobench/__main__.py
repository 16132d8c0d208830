"""``python -m retrobench``: the same dispatcher as the ``retrobench`` console script."""

import sys

from retrobench.cli import main

sys.exit(main())
