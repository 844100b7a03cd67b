"""``python -m profiling fit-prediction PROFILE --model DIR -o OUT``: what a plan's objective means in KL.

    python -m profiling fit-prediction experiments/profiles/r3/english-calibrated-curves.json --model cache/r3 \\
        -o experiments/profiles/r3/english-predicted.json          # 20 random + 6 uniform plans, seed 1

The optimizer minimises O(plan), the ``predicted_loss`` objective: a sum of single effects (measured prune
costs and prune curves, block format costs, top-k costs). Those do not add up once routing flips: on R3 the
median O / measured KL of random mixed plans is 29. The ranking is good (Spearman 0.93), the scale is not.
This step measures whole plans p on the profile's calibration windows (the plan applied in memory, as
``validate`` does) and fits one monotone map by least squares in log space:

    log KL_p = log a + q log O_p,        i.e.  KL(plan) ~= a * O(plan)^q

over ``--plans`` random mixed plans (``validate``'s generator, drawn with ``--seed``, default 1, so
``validate``'s own seed-0 plans stay held out) plus one uniform plan per quantized format. OUT is the
profile with ``prediction = {scale: a, exponent: q, plans, log_rmse}``; costs are unchanged, so every plan's
optimum is too. ``optimizer solve`` then writes ``predicted.kl = a O^q`` into plan.json and
``validate OUT`` reports how the map predicts its held-out plans (median measured / predicted KL).
A fit whose exponent is <= 0 is refused: the objective then does not rank these plans, and no map fixes that.
Measurements are journaled to ``OUT.prediction.jsonl`` (``--resume``); OUT's details file keeps every plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from optimizer.jsonio import write_json
from optimizer.profile import Measurement, Prediction, load_profile, save_profile

from .journal import Journal, model_fingerprint
from .meter import profile_meter
from .model_io import ProfilingError
from .run import details_path
from .validate import measure_plan, objective_terms, predict, random_plan, read_details, uniform_plans


def fit_power(objective: np.ndarray, measured: np.ndarray) -> tuple[float, float, float]:
    """(a, q, rms of the log residuals) of ``measured ~= a * objective^q``, least squares on logs over the
    plans where both are > 0. Raises :class:`ProfilingError` when fewer than 3 such plans have distinct
    objectives, or when q <= 0."""
    o, m = np.asarray(objective, float), np.asarray(measured, float)
    ok = (o > 0) & (m > 0) & np.isfinite(o) & np.isfinite(m)
    if ok.sum() < 3 or np.ptp(np.log(o[ok])) == 0:
        raise ProfilingError(f"fit-prediction: need >= 3 plans with distinct objectives > 0 and measured KL > 0, "
                             f"got {int(ok.sum())}")
    x, y = np.log(o[ok]), np.log(m[ok])
    q, log_a = np.polyfit(x, y, 1)
    if q <= 0:
        raise ProfilingError(f"fit-prediction: the measured KL does not rise with the objective over these plans "
                             f"(fitted exponent {q:.3g}); the profile does not rank plans, so no map can fix its scale")
    rmse = float(np.sqrt(np.mean((y - (log_a + q * x)) ** 2)))
    return float(math.exp(log_a)), float(q), rmse


def run_fit_prediction(args) -> dict:  # noqa: ANN001 - the argparse namespace of ``python -m profiling fit-prediction``
    """The CLI: measure the plans, fit, write OUT (the profile with ``prediction``) and its details file."""
    if args.plans < 3:
        raise ProfilingError(f"--plans: need at least 3, got {args.plans}")
    t0 = time.perf_counter()
    profile = load_profile(args.profile)
    details = read_details(args.profile)
    meter = profile_meter(profile, details, args.model, max_tokens=args.max_tokens, progress=not args.no_progress)
    out = Path(args.output)
    journal = Journal(out.with_name(out.name + ".prediction.jsonl"),
                      {"model": model_fingerprint(args.model), "profile": profile.hash, "data": meter.source,
                       "tokens": meter.engine.tokens, "plans": args.plans, "seed": args.seed}, resume=args.resume)
    journal.check_reference(meter.engine.ref_nll)
    rng = np.random.default_rng(args.seed)
    plans = [random_plan(profile, rng) for _ in range(args.plans)] + uniform_plans(profile)
    terms = objective_terms(profile)
    from tqdm.auto import tqdm

    rows = []
    for i in tqdm(range(len(plans)), desc="plans", disable=args.no_progress, leave=False):
        known = journal.get("plan", i)
        if known is None:
            row = measure_plan(meter, plans[i])
            journal.record("plan", i, row["measured_nll"], row["measured_kl"])
        else:
            row = {"kind": plans[i].get("kind", "random"), "severity": plans[i]["severity"],
                   "measured_nll": known[0], "measured_kl": known[1]}
        rows.append({"plan": i, **row, "objective": predict(profile, plans[i], terms)})
    scale, exponent, rmse = fit_power(np.array([r["objective"] for r in rows]),
                                      np.array([r["measured_kl"] for r in rows]))
    measurement = Measurement(
        method=f"least squares of log KL(original || plan) on log objective over {len(rows)} plans measured whole "
               f"({args.plans} random mixed plans as profiling validate draws them, seed {args.seed}, and one uniform "
               "plan per quantized format)", tokens=meter.engine.tokens, seed=args.seed, source=meter.source)
    prediction = Prediction(scale, exponent, len(rows), rmse, measurement)
    digest = save_profile(replace(profile, prediction=prediction, hash=""), out)
    seconds = time.perf_counter() - t0
    record = {"scale": scale, "exponent": exponent, "log_rmse": rmse, "seed": args.seed,
              "tokens": meter.engine.tokens, "seconds": round(seconds, 1), "rows": rows}
    write_json(details_path(out), {**(details or {}), "profile": out.name, "profile_hash": digest,
                                   "prediction": record}, indent=None)
    journal.close(delete=True)
    return record


def print_fit(record: dict, out: Path) -> None:
    ratios = [r["measured_kl"] / (record["scale"] * max(r["objective"], 0.0) ** record["exponent"])
              for r in record["rows"] if r["objective"] > 0]
    print(f"KL ~ {record['scale']:.4g} * O^{record['exponent']:.3g} over {len(record['rows'])} plans "
          f"({record['tokens']:,} tokens): log rms {record['log_rmse']:.3f}, measured/fitted "
          f"{min(ratios):.3g}-{max(ratios):.3g}; median O/KL before {_median_ratio(record):.3g}; "
          f"{record['seconds']:.0f} s")
    print(f"wrote {out} and {details_path(out)}")


def _median_ratio(record: dict) -> float:
    return float(np.median([r["objective"] / r["measured_kl"] for r in record["rows"] if r["measured_kl"] > 0]))
