"""``python -m profiling gguf-columns PROFILE -o OUT``: GGUF columns for an int-format profile, without measuring.

``optimizer solve --target llamacpp`` needs GGUF types among a profile's formats; a profile measured with
moecc's runtime int formats (``profiling run``'s default) has none. This writes the profile with one column per
GGUF type in :data:`PROXY_BITS`, each a **proxy**: a block's cost in GGUF type T is its cost in the cheapest
int format with T's bits (Q4_0 and Q4_K <- ``int4_g*``, Q8_0 <- ``int8_g*`` ...), and blank where T does not
admit the block's rows (K-quants need rows divisible by 256). A type is left out when some block it admits has
no int cost to borrow. The int columns are replaced; float columns stay; the sensitivity's measurement says
the GGUF columns are proxies; a prediction map is dropped (the objective changed). Measuring the GGUF types
themselves is ``python -m profiling run --target llamacpp``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from optimizer.formats import INT_FAMILY, get_format
from optimizer.profile import Profile, Sensitivity, load_profile, save_profile, with_costs

from .model_io import ProfilingError

#: GGUF type -> bits of the runtime int format whose cost it borrows
PROXY_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_K": 4, "Q5_0": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}


def gguf_columns(profile: Profile) -> Profile:
    """``profile`` with proxy GGUF columns in place of its int columns (see the module docstring)."""
    names, cols = [], []
    values = profile.sensitivity.values
    int_cols = {j: get_format(f) for j, f in enumerate(profile.sensitivity.formats)
                if get_format(f).family == INT_FAMILY}
    for gguf_type, bits in PROXY_BITS.items():
        fmt = get_format(gguf_type)
        sources = [j for j, f in int_cols.items() if f.bits == bits]
        col = np.full(len(profile.architecture.blocks), np.nan)
        for b, block in enumerate(profile.architecture.blocks):
            if block.quantizable and fmt.admits(block.shape):
                known = [values[b, j] for j in sources if not np.isnan(values[b, j])]
                if not known:
                    break
                col[b] = min(known)
        else:
            if np.any(~np.isnan(col)):
                names.append(gguf_type)
                cols.append(col)
    if not names:
        raise ProfilingError(f"the profile's formats ({', '.join(profile.formats)}) give no int costs any GGUF type "
                             "can borrow")
    for j, f in enumerate(profile.sensitivity.formats):
        if j not in int_cols:
            names.append(f)
            cols.append(values[:, j])
    meas = replace(profile.sensitivity.measurement, method=profile.sensitivity.measurement.method
                   + "; GGUF columns are PROXIES: each copies the cheapest int format of the same bits "
                   "(profiling gguf-columns)")
    sens = Sensitivity(tuple(names), np.stack(cols, axis=1), meas)
    return with_costs(profile, formats=tuple(names), sensitivity=sens)


def write_gguf_columns(src: Path, out: Path) -> Profile:
    """Read ``src``, write its :func:`gguf_columns` version to ``out``; returns it."""
    profile = gguf_columns(load_profile(src))
    save_profile(profile, out)
    return profile
