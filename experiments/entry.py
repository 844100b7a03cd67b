"""Entry point of the experiment scripts: bad input ends in one line on stderr and exit code 2, as in every CLI.

    if __name__ == "__main__":
        sys.exit(run_main(main))
"""
from __future__ import annotations

import sys
from typing import Callable

from optimizer.errors import InputError


def run_main(main: Callable[[], int]) -> int:
    """Call ``main()``; an :class:`InputError` (bad model directory, profile, flag) becomes ``error: ...``, exit 2."""
    try:
        return int(main() or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
