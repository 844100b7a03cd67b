"""``python -m profiling memory``: peak resident memory of profiling in memory vs streamed.

Peak RSS is a per-process high-water mark, so each mode runs in its own child process:
``python -m profiling run --measure none`` (reference pass with router hooks and the importance-matrix
proxy; no perturbations, no device test), once plainly and once with ``--streamed``. Each child writes its
``resource.getrusage`` peak into its details file; this prints both, with the checkpoint size for scale.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .model_io import ProfilingError


def _checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def compare_memory(model_dir: Path, data: str, max_tokens: int, threads: int | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("in memory", "streamed"):
            out = Path(tmp) / f"{mode.replace(' ', '_')}.json"
            cmd = [sys.executable, "-m", "profiling", "run", "--model", str(model_dir), "--data", data,
                   "--max-tokens", str(max_tokens), "--measure", "none", "--no-progress", "-o", str(out)]
            if threads:
                cmd += ["--threads", str(threads)]
            if mode == "streamed":
                cmd.append("--streamed")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                line = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                raise ProfilingError(f"{mode} run failed: {line}")
            d = json.loads(out.with_name(out.stem + ".details.json").read_text())
            results[mode] = {"peak_rss_bytes": d["peak_rss_bytes"], "seconds": d["timings_s"]["total"]}
    t = Table(title=f"peak RSS, reference pass over {max_tokens} tokens "
                    f"(checkpoint {_checkpoint_bytes(model_dir) / 2**20:,.1f} MiB)")
    for col in ("mode", "peak RSS (MiB)", "time (s)"):
        t.add_column(col, justify="right")
    for mode, r in results.items():
        t.add_row(mode, f"{r['peak_rss_bytes'] / 2**20:,.0f}", f"{r['seconds']:.1f}")
    Console().print(t)
    return results
