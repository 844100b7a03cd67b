"""``python -m optimizer``: see :mod:`optimizer.cli`."""

import sys

from .cli import main

sys.exit(main())
