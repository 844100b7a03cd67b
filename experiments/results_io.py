"""Tidy result rows to CSV, shared by the benchmark and experiment scripts."""

from __future__ import annotations

import csv
from pathlib import Path


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` as CSV with the union of their keys as columns (first-seen order); print where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
