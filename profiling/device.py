"""Throughput of this machine: memory bandwidth and dequantize+matmul speed of the runtime's formats.

    python -m profiling device [--formats F ...] [--repeats 5] [--json] [--profile PROFILE -o OUT]

(``profiling run`` measures the same, :func:`measure_device`, unless ``--measure`` leaves ``device`` out; the
``device`` command measures it alone, and with ``--profile`` writes that profile with this machine's device
section, e.g. to solve with ``--min-tokens-per-s`` for the machine the plan will run on.)

* **Memory bandwidth**: ``numpy.copyto`` of a ``bandwidth_mib`` MiB float32 array into another, repeated;
  bandwidth = 2 x bytes (read + write) / median time.
* **Format throughput** (per format): a ``rows x cols`` float32 weight (seeded normal) is stored with
  ``runtime.quant.quantize``; one step is ``dequantize()`` (the runtime's own unpacking) followed by a
  matmul with a ``cols x batch`` activation (batch 1 = decoding). Throughput = bytes of the weight in that
  format (``optimizer.formats`` byte count, equal to the stored bytes) / median step time, i.e. bytes of
  weights the runtime consumes per second.

Also peak resident memory of the process (``resource.getrusage``; psutil's RSS when available).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from optimizer.formats import get_format
from optimizer.profile import Device, Measurement
from runtime.quant import quantize

#: the bandwidth copy's size in MiB, and format_throughput's weight shape
BANDWIDTH_MIB = 256
WEIGHT_ROWS, WEIGHT_COLS = 1024, 4096


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unsupported platform
        return None


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(mib: int = BANDWIDTH_MIB, repeats: int = 7) -> float:
    """Bytes per second moved by a large array copy (read + write)."""
    n = mib * (1 << 20) // 4
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    t = _median_time(lambda: np.copyto(dst, src), repeats)
    return 2.0 * src.nbytes / t


def format_throughput(formats: Sequence[str], rows: int = WEIGHT_ROWS, cols: int = WEIGHT_COLS, batch: int = 1,
                      repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Bytes of weights per second of dequantize + matmul, per format (see the module docstring). A format whose
    groups do not divide ``cols`` (``int3_g80``) is timed on the first ``cols`` rounded down to a multiple of its
    group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    x = torch.randn(cols, batch, generator=g)
    out = {}
    for f in formats:
        fmt = get_format(f)
        c = max(cols - cols % fmt.block_elements, fmt.block_elements)
        qt = quantize(w[:, :c].contiguous() if c != cols else w, fmt.name, warn=False)
        t = _median_time(lambda qt=qt, xc=x[:c]: qt.dequantize(torch.float32) @ xc, repeats)
        out[fmt.name] = qt.nbytes / t  # bytes actually stored (a mapped GGUF type: its runtime storage)
    return out


def measure_device(formats: Sequence[str], repeats: int = 5, seed: int = 0) -> Device:
    """The profile's ``device`` section, measured here: memory bandwidth and each format's throughput."""
    bw = memory_bandwidth(repeats=repeats)
    tp = format_throughput(formats, repeats=repeats, seed=seed)
    return Device(bw, Measurement(
        method=f"memory bandwidth: median of {repeats} numpy copies of {BANDWIDTH_MIB} MiB, 2 x bytes / s; "
               f"format_throughput: stored bytes / median time of runtime.quant dequantize() + matmul of a "
               f"{WEIGHT_ROWS}x{WEIGHT_COLS} weight (columns rounded down to a multiple of the format's group) with a "
               f"batch-1 vector, {torch.get_num_threads()} torch threads",
        seed=seed), tp)
