"""Format costs calibrated on whole plans: do they make the ILP's mixed-precision plans beat uniform?

    python -m experiments.group_calibration --model cache/r3 --profile experiments/profiles/r3/english.json \
        --budgets 95MB,110MB,130MB,160MB --out experiments/results/group_calibration_r3.json \
        --calibrated experiments/profiles/r3/english-calibrated.json    # ~5 min; without --calibrated ~25 min

:mod:`profiling.calibrate` measures uniform, per-group and per-layer plans on the profile's calibration windows
and fits ``KL ~ S^p``, ``S = sum_b w_g v_l r_f P(b, f)``. This study solves the ILP with mixed precision alone
(every expert kept, original k) at each budget under four cost models: the profile's own costs, and S with
group weights only (``w``), with layer factors (``w v``), and with format factors too (``w v r``, the
calibrated profile's). Each plan is measured on the same calibration windows (KL to the original), beside the
uniform plans. One row per plan in ``--out`` (JSON), with the fit. ``--resume`` reuses the measurements
journaled in ``OUT.calibration.jsonl`` by an interrupted run.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from experiments.entry import run_main
from optimizer.budget import make_budget
from optimizer.errors import InfeasibleError, InputError
from optimizer.formats import get_format
from optimizer.formulation.instance import FormulationOptions
from optimizer.jsonio import read_json, write_json
from optimizer.plan import Plan
from optimizer.profile import Profile
from optimizer.solve import SolveOptions, optimize
from profiling.calibrate import Calibration, Calibrator, calibrated_profile, read_profile_details
from profiling.run import details_path


@dataclass(frozen=True)
class Config:
    model: str
    profile: str
    budgets: tuple[str, ...]
    out: str
    max_tokens: int | None = None  # default: the profile's calibration tokens
    resume: bool = False
    calibrated: str | None = None  # a profile written by `profiling calibrate` from --profile: reuse its measurements


def quantize_only(profile: Profile, budget: str) -> Plan | None:
    """The ILP with every expert kept and the original k at ``budget`` (None: nothing fits)."""
    arch = profile.architecture
    options = FormulationOptions(objective="predicted_loss",
                                 min_experts=float(min(m.num_experts for m in arch.moe_layers)),
                                 min_top_k=min(m.top_k for m in arch.moe_layers))
    try:
        return optimize(profile, make_budget(arch, budget, 0, 0), options,
                        SolveOptions(solver="highs", time_limit=60.0, reproducible=True))
    except InfeasibleError:
        return None


def cost_models(profile: Profile, cal: Calibration, details: dict) -> list[tuple[str, Profile]]:
    link = cal.link
    variants = [("w", replace(link, layers={}, formats={})), ("w v", replace(link, formats={})), ("w v r", link)]
    raw, groups = details["proxy_raw"], details["groups"]
    # absorb=False: the study's plans keep every expert, so single-candidate cells only shift every prediction
    # by one constant; keeping them reproduces the committed results exactly
    return [("profile costs", profile)] + [
        (f"S = sum {name} P", calibrated_profile(profile, replace(cal, link=lk), raw, groups, absorb=False))
        for name, lk in variants]


def known_measurements(calibrated: str | None) -> tuple[dict[str, float], int | None]:
    """(label -> KL, calibration tokens) of the plans ``profiling calibrate`` measured for ``calibrated``."""
    if calibrated is None:
        return {}, None
    dpath = details_path(Path(calibrated))
    details = read_json(dpath)[0] if dpath.is_file() else {}
    if "calibration" not in details:
        raise InputError(f"--calibrated: {dpath} holds no calibration (write it with `python -m profiling calibrate`)")
    cal = details["calibration"]
    return {r["plan"]: r["measured_kl"] for r in cal["rows"]}, cal["tokens"]


def run(cfg: Config) -> dict:
    profile, details = read_profile_details(cfg.profile)
    known, known_tokens = known_measurements(cfg.calibrated)
    out = Path(cfg.out)
    calibrator = Calibrator(profile, details, Path(cfg.model), cfg.max_tokens, resume=cfg.resume,
                            journal=out.with_name(out.name + ".calibration.jsonl"), say=print, known=known)
    if known_tokens is not None and calibrator.meter.engine.tokens != known_tokens:
        raise InputError(f"--calibrated: {cfg.calibrated} was measured on another number of tokens")
    cal = calibrator.run()
    rows = list(cal.rows)
    for budget in cfg.budgets:
        for name, costs in cost_models(profile, cal, details):
            plan = quantize_only(costs, budget)
            if plan is None:
                rows.append({"plan": f"quantize_only, {name}", "budget": budget, "status": "does not fit"})
                continue
            formats = {n: f for n, f in plan.formats.items()  # as refine measures: float formats left as they are
                       if n in calibrator.admits and get_format(f).quantized}
            kl = calibrator.measured(f"quantize_only at {budget}, {name}", formats)
            rows.append({"plan": f"quantize_only, {name}", "budget": budget, "bytes": plan.bytes.total,
                         "measured_kl": kl})
    return {"model": cfg.model, "profile": cfg.profile, "tokens": cal.tokens, "seconds": cal.seconds,
            "link": cal.link.to_json(), "reference_format": cal.reference, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.group_calibration", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--budgets", required=True, help="comma-separated weight budgets, e.g. 95MB,110MB")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON file for the rows and the fit")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--calibrated", default=None,
                    help="a profile `profiling calibrate` wrote from --profile: its measured plans are reused")
    a = ap.parse_args(argv)
    result = run(Config(a.model, a.profile, tuple(b for b in a.budgets.split(",") if b), a.out, a.max_tokens,
                        a.resume, a.calibrated))
    write_json(a.out, result)
    Path(a.out).with_name(Path(a.out).name + ".calibration.jsonl").unlink(missing_ok=True)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
