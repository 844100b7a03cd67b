"""Reference bits/byte on a corpus split: byte unigram (fit on train) and ``xz -9``.

    .venv/bin/python -m experiments.reference_models.baselines [--corpus english] [--split test]
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import sys
from collections import Counter

from runtime.corpora import load_corpus_bytes


def unigram_bpb(train: bytes, test: bytes) -> float:
    """Cross-entropy (bits/byte) of ``test`` under add-one-smoothed byte frequencies of ``train``."""
    counts = Counter(train)
    total = len(train) + 256
    return -sum(n * math.log2((counts.get(b, 0) + 1) / total) for b, n in Counter(test).items()) / len(test)


def xz_bpb(data: bytes) -> float:
    """Bits/byte of ``xz -9e`` (LZMA2, preset 9 extreme) on ``data`` alone."""
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8 / len(data)


def baselines(corpus: str = "english", split: str = "test") -> dict[str, float]:
    """Both baselines plus the split's size."""
    test = load_corpus_bytes(corpus, split)
    train = load_corpus_bytes(corpus, "train")
    return {"bytes": len(test), "unigram_bpb": unigram_bpb(train, test), "xz9_bpb": xz_bpb(test)}


def main(argv: list[str] | None = None) -> int:
    """Print the baselines as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="english")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    print(json.dumps(baselines(args.corpus, args.split), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
