"""Devices that decode the plan: ``--device NAME|FILE`` for ``optimizer solve`` and ``optimizer pareto``.

    python -m optimizer devices                                    # the presets, with their sources
    python -m optimizer solve PROFILE --budget 128GB --device m4-max --min-tokens-per-s 10
    python -m profiling device -o device.json                      # this machine, measured
    python -m optimizer solve PROFILE --budget 128GB --device device.json

The speed model (constraint (5) of :mod:`optimizer.formulation.constraints`) prices a decoded token as

    seconds per token = token overhead + bytes read per token / memory bandwidth,
    bytes read        = sum over read blocks of bytes x max(1, bandwidth / throughput(format))

A preset is the vendor's published peak memory bandwidth and no per-format throughput, so it prices bytes
alone: its tokens/s are an upper bound (decoders reach a fraction of peak bandwidth, and a slow dequantizing
kernel makes a format compute-bound; ``python -m profiling device`` measures both on the machine at hand).
A FILE is a profile's ``device`` section as JSON (:func:`optimizer.profile.device_to_json`). Either replaces
the profile's own device section for that solve; the plan records which device priced it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .jsonio import read_json
from .profile import Device, Measurement, device_from_json


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    memory_gb: int  # the largest memory configuration sold, GB
    bandwidth_gb_s: float  # published peak memory bandwidth, GB/s (1e9 bytes)
    source: str

    def device(self) -> Device:
        return Device(self.bandwidth_gb_s * 1e9, Measurement(
            method=f"preset {self.name}: {self.description}, published peak bandwidth {self.bandwidth_gb_s:g} GB/s",
            source=self.source, prior=True))


#: the 128 GB-class machines large MoEs are decoded on; bandwidths as published by the vendor.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("m3-max", "Apple M3 Max (16-core CPU, 40-core GPU)", 128, 400,
           "https://www.apple.com/newsroom/2023/10/apple-unveils-m3-m3-pro-and-m3-max-the-most-advanced-chips-for-a-"
           "personal-computer/"),
    Preset("m4-max", "Apple M4 Max (16-core CPU, 40-core GPU)", 128, 546,
           "https://www.apple.com/newsroom/2024/10/apple-introduces-m4-pro-and-m4-max/"),
    Preset("m2-ultra", "Apple M2 Ultra", 192, 800, "https://www.apple.com/newsroom/2023/06/apple-introduces-m2-ultra/"),
    Preset("m3-ultra", "Apple M3 Ultra", 512, 819,
           "https://www.apple.com/newsroom/2025/03/apple-reveals-m3-ultra-taking-apple-silicon-to-a-new-extreme/"),
    Preset("ryzen-ai-max-395", "AMD Ryzen AI Max+ 395 (256-bit LPDDR5X-8000)", 128, 256,
           "https://www.amd.com/en/products/processors/laptop/ryzen/ai-300-series/amd-ryzen-ai-max-plus-395.html"),
    Preset("dgx-spark", "NVIDIA DGX Spark (GB10, 128 GB LPDDR5x)", 128, 273,
           "https://www.nvidia.com/en-us/products/workstations/dgx-spark/"),
    Preset("epyc-12ch-ddr5-4800", "a CPU+GPU offload server's CPU side: 12 channels of DDR5-4800 (AMD EPYC 9004); "
           "12 x 8 bytes x 4.8e9 transfers/s", 768, 460.8,
           "https://www.amd.com/en/products/processors/server/epyc/4th-generation-9004-and-8004-series.html"),
    Preset("ddr5-2ch-5600", "a desktop's CPU side: 2 channels of DDR5-5600; 2 x 8 bytes x 5.6e9 transfers/s",
           128, 89.6, "JEDEC JESD79-5 data rate (DDR5-5600: 5,600 MT/s on a 64-bit channel)"),
)}


def load_device(spec: str) -> Device:
    """The device named by ``--device``: a preset name, else a device JSON file; InputError otherwise."""
    if spec in PRESETS:
        return PRESETS[spec].device()
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--device: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a device JSON file "
                         "(`python -m profiling device -o device.json` writes one)")
    doc, _ = read_json(path)
    return device_from_json(doc, f"--device {spec}")


def render_presets() -> str:
    """The table ``python -m optimizer devices`` prints."""
    rows = [f"{'name':<20} {'GB/s':>7} {'max GB':>7}  device / source"]
    for p in PRESETS.values():
        rows.append(f"{p.name:<20} {p.bandwidth_gb_s:>7g} {p.memory_gb:>7}  {p.description}")
        rows.append(f"{'':<37}{p.source}")
    return "\n".join(rows)
