"""``python -m profiling refit PROFILE [-o OUT]``: refill a profile's proxy cells without measuring again.

A profile's sensitivity table holds measured cells and, for the blocks that were not measured, the
importance-matrix proxy scaled by :mod:`profiling.fit`. The details file keeps everything the fit needs (raw
proxies, measured NLL and KL tables, groups, the cost that was chosen), so a change of the fit rule, or a
profile written by an older version, is brought up to date in seconds instead of re-running hours of
perturbations. Measured cells, expert statistics, top-k costs and the device section are not touched.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from optimizer.jsonio import write_json
from optimizer.profile import Profile, load_profile, save_profile, with_costs

from .fit import PROXY_SENTENCE_START, apply_fit, fit_proxy, proxy_sentence
from .model_io import ProfilingError
from .run import details_path


def refit(profile_path: Path, out: Path | None = None, rule: str = "group_format",
          proxy_only: bool = False) -> tuple[Profile, dict, Path]:
    """Rewrite ``out`` (default: in place) and its details file; returns (profile, details, out).

    ``rule``: :data:`profiling.fit.RULES`. ``proxy_only``: the fitted proxy replaces the measured cells too
    (the measurements then only set the scales). On R3 single-block measurements sit on a routing-flip
    floor that does not add up over a plan; plans solved from the proxy alone with one scale per group
    were better there (docs/profiling.md, R3).
    """
    from .fit import RULES

    if rule not in RULES:
        raise ProfilingError(f"--rule: {rule!r} is not one of {', '.join(RULES)}")
    profile_path = Path(profile_path)
    out = Path(out) if out is not None else profile_path
    profile = load_profile(profile_path)
    dpath = details_path(profile_path)
    if not dpath.is_file():
        raise ProfilingError(f"{profile_path}: no details file {dpath.name}; refit needs the raw tables")
    try:
        details = json.loads(dpath.read_text(encoding="utf-8"))
        raw, groups, index = details["proxy_raw"], details["groups"], details["block_index"]
        chosen = details["measured_kl"] if details.get("cost", "kl") == "kl" else details["measured_nll"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ProfilingError(f"{dpath}: not a profiling details file ({exc})") from None
    if not any(chosen.values()):
        raise ProfilingError(f"{profile_path}: no measured sensitivities, nothing to fit (profile with "
                             f"--measure including sensitivity)")
    formats = list(profile.sensitivity.formats)
    fit = fit_proxy(raw, chosen, groups, rule)
    wfit = fit_proxy(details["weight_error_raw"], chosen, groups, rule)
    fitted = apply_fit(raw, fit, groups)
    values = np.array(profile.sensitivity.values, dtype=float, copy=True)
    changed = 0
    for name, row in fitted.items():
        i = index[name]
        for j, f in enumerate(formats):
            if f in row and np.isfinite(values[i, j]) and (proxy_only or chosen.get(name, {}).get(f) is None):
                changed += not math.isclose(values[i, j], row[f], rel_tol=1e-5)  # profiles store 6 significant digits
                values[i, j] = row[f]
    method = profile.sensitivity.measurement.method
    cut = method.find(PROXY_SENTENCE_START)
    if cut < 0:
        raise ProfilingError(f"{profile_path}: the sensitivity method does not describe fitted proxy cells")
    method = method[:cut] + proxy_sentence(fit, details_path(out).name, proxy_only)
    sensitivity = dataclasses.replace(
        profile.sensitivity, values=values,
        measurement=dataclasses.replace(profile.sensitivity.measurement, method=method))
    profile = with_costs(profile, sensitivity=sensitivity)
    digest = save_profile(profile, out)
    load_profile(out)  # the contract's own checks
    details.update(profile=out.name, profile_hash=digest, proxy_fitted=fitted, proxy_fit=fit.to_json(),
                   weight_error_fitted=apply_fit(details["weight_error_raw"], wfit, groups),
                   weight_error_fit=wfit.to_json(),
                   refit={"cells_changed": int(changed), "rule": rule, "proxy_only": proxy_only})
    write_json(details_path(out), details, indent=None)
    return profile, details, out
