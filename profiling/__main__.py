"""``python -m profiling``: see :mod:`profiling.cli`."""
import sys

from .cli import main

sys.exit(main())
