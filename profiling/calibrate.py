"""``python -m profiling calibrate PROFILE --model DIR -o OUT``: format costs calibrated on whole plans.

A profile's format costs are single-block effects. On pretrained weights with near-tied routers (R3) every
single block sits on a routing-flip floor: uniform int4 is predicted at 21.0 nats/token and measured at 0.74,
and the ILP's mixed-precision plans lose to uniform quantization. This step prices formats from plans that
quantize many blocks at once, measured on the profile's calibration windows (KL(original || plan) per token):

* ``U(f)``: every quantizable block in format f (one plan per candidate format);
* ``M(g, f)``: the blocks of one (kind, projection) group g alone in f, e.g. ``routed_expert.up_proj``;
* ``M_l``: the blocks of decoder layer l alone in the probe format (``--layer-probe``, default the 3-bit
  candidate).

With ``P(b, f)`` the importance-matrix proxy of block b (the details file's ``proxy_raw``: the squared
output error the block adds), the model is a monotone link of a weighted proxy sum:

    KL(plan) ~ S^p,      S = sum_b  w_g(b) v_l(b) r_f(b) P(b, f_b)

fitted in three steps: ``log M(g, f) = p log(w_g P_g(f))`` by least squares over groups and formats (one p,
one w_g per group); ``v_l = M_l^(1/p) / S_l`` (median 1) from the layer plans; ``r_f = (U(f) / S_f^p)^(1/p)``
so that every uniform plan is predicted exactly. Because ``S -> S^p`` is monotone, minimising S minimises the
predicted KL. The calibrated cells are ``c(b, f) = p S*^(p-1) w v r P(b, f)``: S's terms in nats/token,
linearised at S* (the uniform plan whose KL is the geometric middle of the measured uniform plans), so
that prune and top-k costs (left as measured) trade against them; ``profiling refine`` re-scales the format
part against measured plans at its budget.

On R3 (1,024 calibration tokens) the ILP with mixed precision alone went from losing to uniform quantization
to beating the uniform plan that fits at 110, 130 and 160 MB (``docs/results/r3_calibrated/report.md``). A
"uniform f" plan stores a block that f cannot store in f's same-bits stand-in
(:func:`optimizer.formats.same_bits_stand_in`), as the ``uniform`` baseline does. OUT's
``sensitivity.measurement.method`` says which groups were calibrated; the details file (``OUT.details.json``)
keeps every measured plan and the fit under ``calibration``. Measurements are
journaled to ``OUT.calibration.jsonl``: an interrupted run continues with ``--resume``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from optimizer.errors import InputError
from optimizer.formats import get_format, same_bits_stand_in
from optimizer.jsonio import read_json, write_json
from optimizer.profile import Profile, Sensitivity, load_profile, save_profile, with_costs

from .blocks import quantize_blocks
from .meter import PlanMeter
from .run import details_path


@dataclass(frozen=True)
class Link:
    """``KL ~ S^p``, ``S = sum_b w_g v_l r_f P(b, f)`` (see the module docstring)."""

    p: float
    weights: dict[str, float]  # w_g per group
    layers: dict[int, float] = field(default_factory=dict)  # v_l, median 1 (missing: 1)
    formats: dict[str, float] = field(default_factory=dict)  # r_f (missing: 1)

    def factor(self, group: str, layer: int | None, fmt: str) -> float:
        """``w_g v_l r_f``: the multiplier of ``P(b, f)`` in S."""
        return self.weights[group] * self.layers.get(layer, 1.0) * self.formats.get(fmt, 1.0)

    def to_json(self) -> dict:
        return {"p": self.p, "group_weights": self.weights,
                "layer_factors": {str(k): v for k, v in self.layers.items()}, "format_factors": self.formats}


def fit_link(rows: list[tuple[str, float, float]]) -> Link:
    """``log M = p log P + c_g`` by least squares over (group, P, M) rows with P, M > 0; ``w_g = exp(c_g / p)``."""
    rows = [r for r in rows if r[1] > 0 and r[2] > 0]
    groups = sorted({g for g, _, _ in rows})
    if len(rows) <= len(groups) or len({p for _, p, _ in rows}) < 2:
        raise InputError("calibrate: too few group plans with a positive proxy and KL to fit the link "
                         f"({len(rows)} for {len(groups)} groups)")
    x = np.column_stack([[math.log(p) for _, p, _ in rows]]
                        + [[1.0 if g == h else 0.0 for g, _, _ in rows] for h in groups])
    coef = np.linalg.lstsq(x, np.log([m for _, _, m in rows]), rcond=None)[0]
    p = float(coef[0])
    if not p > 0:
        raise InputError(f"calibrate: the fitted exponent p = {p:.3g} is not positive (the measured KL does not "
                         "grow with the proxy); the profile's costs are left as they are")
    return Link(p, {g: float(math.exp(c / p)) for g, c in zip(groups, coef[1:])})


@dataclass
class Calibration:
    link: Link
    rows: list[dict]  # every measured plan: label, blocks, format / group / layer, measured KL, predicted KL
    reference: str  # the uniform format whose S is S*
    s_ref: float
    seconds: float
    tokens: int

    @property
    def scale(self) -> float:
        """``p S*^(p-1)``: nats/token per unit of S at the reference plan."""
        return self.link.p * self.s_ref ** (self.link.p - 1.0)


class Calibrator:
    """Measures the plans of the module docstring on a profile's calibration windows (journaled)."""

    def __init__(self, profile: Profile, details: dict, model_dir: Path, tokens: int | None = None,
                 journal: Path | None = None, resume: bool = False, progress: bool = False,
                 say: Callable[[str], None] = lambda s: None, known: dict[str, float] | None = None):
        self.profile, self.say = profile, say
        self.raw, self.groups = details["proxy_raw"], details["groups"]
        self.meter = PlanMeter(profile, model_dir, details["data"], tokens or details["tokens"],
                               details["window"], progress)
        sens = profile.sensitivity
        self.formats = [f for f in sens.formats if get_format(f).quantized]
        values = np.asarray(sens.values, float)
        col = {f: j for j, f in enumerate(sens.formats)}
        self.admits = {b.name: {f for f in self.formats if np.isfinite(values[i, col[f]])
                                and self.raw.get(b.name, {}).get(f) is not None}
                       for i, b in enumerate(profile.architecture.blocks)
                       if b.quantizable and b.name in self.groups and b.name in self.meter.refs}
        self.layer_of = {b.name: b.layer for b in profile.architecture.blocks}
        self.journal, self.cache = journal, dict(known or {})  # known: label -> KL measured before
        if journal is not None and resume and journal.is_file():
            for line in journal.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if entry.get("tokens") == self.meter.engine.tokens:
                    self.cache[entry["label"]] = entry["kl"]
        elif journal is not None:
            journal.write_text("", encoding="utf-8")

    def measured(self, label: str, formats: dict[str, str]) -> float:
        """KL of the model with ``formats`` (block -> format) fake-quantized, the rest as it is."""
        if label not in self.cache:
            items = [(self.meter.refs[n], f) for n, f in formats.items()]
            self.cache[label] = self.meter.engine.evaluate_full(
                lambda: quantize_blocks(self.meter.runner.model, items)).kl
            if self.journal is not None:
                with open(self.journal, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"label": label, "kl": self.cache[label],
                                         "tokens": self.meter.engine.tokens}) + "\n")
        self.say(f"{label} ({len(formats)} blocks): KL {self.cache[label]:.4g}")
        return self.cache[label]

    def s_sum(self, formats: dict[str, str], link: Link) -> float:
        return float(sum(link.factor(self.groups[n], self.layer_of[n], f) * self.raw[n][f]
                         for n, f in formats.items() if self.groups[n] in link.weights))

    def uniform(self, fmt: str) -> dict[str, str]:
        """Every block in ``fmt`` or its same-bits stand-in; a block with neither stays as it is."""
        stand_in = {n: same_bits_stand_in(fmt, a) for n, a in self.admits.items()}
        return {n: f for n, f in stand_in.items() if f is not None}

    def run(self, layer_probe: str | None = "auto", format_correction: bool = True) -> Calibration:
        """Measure, fit and return the calibration; ``layer_probe`` "auto": :func:`default_probe`, None: no layer
        factors."""
        if layer_probe == "auto":
            layer_probe = default_probe(self.profile)
        t0 = time.perf_counter()
        check_probe(layer_probe, self.profile)
        rows = [{"plan": f"uniform {f}", "format": f, "measured_kl": self.measured(f"uniform {f}", self.uniform(f))}
                for f in self.formats]
        fit_rows = []
        for g in sorted({self.groups[n] for n in self.admits}):
            for f in self.formats:
                plan = {n: f for n, a in self.admits.items() if self.groups[n] == g and f in a}
                if plan:
                    label = f"group {g} in {f}"
                    fit_rows.append((g, float(sum(self.raw[n][f] for n in plan)), self.measured(label, plan)))
                    rows.append({"plan": label, "group": g, "format": f, "blocks": len(plan),
                                 "proxy": fit_rows[-1][1], "measured_kl": fit_rows[-1][2]})
        link = fit_link(fit_rows)
        if layer_probe is not None:
            link = self._layer_factors(link, layer_probe, rows)
        uniform = {r["format"]: r for r in rows if r["plan"].startswith("uniform")}
        before = {f: self.s_sum(self.uniform(f), link) ** link.p for f in uniform}
        for f, r in uniform.items():
            r["predicted_kl_before_format_factors"] = before[f]
        if format_correction:
            link = replace(link, formats={f: (r["measured_kl"] / before[f]) ** (1 / link.p)
                                          for f, r in uniform.items() if min(r["measured_kl"], before[f]) > 0})
        for r in rows:
            if r["plan"].startswith("uniform"):
                r["predicted_kl"] = self.s_sum(self.uniform(r["format"]), link) ** link.p
        reference = _middle(uniform)
        return Calibration(link, rows, reference, self.s_sum(self.uniform(reference), link),
                           time.perf_counter() - t0, self.meter.engine.tokens)

    def _layer_factors(self, link: Link, probe: str, rows: list[dict]) -> Link:
        factors = {}
        for layer in sorted({self.layer_of[n] for n in self.admits if self.layer_of[n] is not None}):
            plan = {n: probe for n, a in self.admits.items() if self.layer_of[n] == layer and probe in a}
            if not plan:
                continue
            kl = self.measured(f"layer {layer} in {probe}", plan)
            s = self.s_sum(plan, link)
            rows.append({"plan": f"layer {layer} in {probe}", "layer": layer, "format": probe, "blocks": len(plan),
                         "measured_kl": kl})
            if kl > 0 and s > 0:
                factors[layer] = kl ** (1 / link.p) / s
        if not factors:
            return link
        median = float(np.median(list(factors.values())))
        return replace(link, layers={layer: v / median for layer, v in factors.items()})


def default_probe(profile: Profile) -> str:
    """The format layers are probed in by default: the profile's 3-bit candidate (the most bits per weight among
    several), else its second-smallest quantized format (a clear signal above the noise, short of collapse)."""
    formats = sorted((f for f in profile.sensitivity.formats if get_format(f).quantized),
                     key=lambda f: get_format(f).bits_per_weight)
    if not formats:
        raise InputError("calibrate: the profile has no quantized candidate format")
    three = [f for f in formats if get_format(f).bits == 3]
    return three[-1] if three else formats[min(1, len(formats) - 1)]


def check_probe(probe: str | None, profile: Profile) -> None:
    """``--layer-probe`` must be one of the profile's quantized candidate formats (checked before any model load)."""
    formats = [f for f in profile.sensitivity.formats if get_format(f).quantized]
    if probe is not None and probe not in formats:
        raise InputError(f"--layer-probe: {probe} is not a quantized candidate format of the profile "
                         f"({', '.join(formats)})")


def _middle(uniform: dict[str, dict]) -> str:
    """The uniform format whose measured KL is nearest (in log) to the geometric middle of them all."""
    kl = {f: r["measured_kl"] for f, r in uniform.items() if r["measured_kl"] > 0}
    if not kl:
        raise InputError("calibrate: no uniform plan has a positive measured KL")
    mid = (math.log(min(kl.values())) + math.log(max(kl.values()))) / 2
    return min(kl, key=lambda f: (abs(math.log(kl[f]) - mid), f))


def calibrated_profile(profile: Profile, cal: Calibration, raw: dict, groups: dict, absorb: bool = True) -> Profile:
    """``profile`` with every calibrated block's cells ``scale x w v r P(b, f)``; with ``absorb``, blocks outside
    the calibrated groups that have a single candidate format cost 0 there (:func:`_absorb_fixed_choice`); the
    rest unchanged."""
    sens = profile.sensitivity
    values = np.array(sens.values, dtype=float, copy=True)
    link, scale = cal.link, cal.scale
    absorbed = 0
    for i, b in enumerate(profile.architecture.blocks):
        if groups.get(b.name) not in link.weights:
            absorbed += _absorb_fixed_choice(values[i]) if b.quantizable and absorb else 0
            continue
        for j, f in enumerate(sens.formats):
            cell = raw.get(b.name, {}).get(f)
            if cell is not None and np.isfinite(values[i, j]):
                values[i, j] = scale * link.factor(groups[b.name], b.layer, f) * cell
    method = (f"calibrated on whole plans measured on {cal.tokens:,} calibration tokens (profiling.calibrate): "
              f"KL ~ S^p with p = {link.p:.3g}, S = sum_b w_g v_l r_f P(b, f), P the importance-matrix proxy, "
              f"w_g for the groups {', '.join(sorted(link.weights))}, {len(link.layers)} layer factors, "
              f"{len(link.formats)} format factors; cells p S*^(p-1) w v r P (S* = S of uniform {cal.reference}); "
              f"{absorbed} blocks outside those groups with a single candidate format are priced 0 (every measured "
              f"uniform plan holds them so: their effect is inside the fit); other blocks keep the original's values. "
              f"Original: {sens.measurement.method}")
    measurement = replace(sens.measurement, method=method)
    return with_costs(profile, sensitivity=Sensitivity(sens.formats, values, measurement))


def _absorb_fixed_choice(row: np.ndarray) -> int:
    """Set the cell of a block with exactly one candidate format to 0 (in place); 1 if it did.

    Every measured uniform plan holds such a block (R3's routed ``down_proj``, BF16 only) in that format, so
    the fitted link already explains its effect; its single-block cell (a routing-flip noise floor on R3, up to
    0.03 nats/token) would count it twice, and make pruning the expert look like a saving at any budget.
    """
    finite = np.flatnonzero(np.isfinite(row))
    if len(finite) != 1 or row[finite[0]] == 0.0:
        return 0
    row[finite[0]] = 0.0
    return 1


def read_profile_details(profile_path: str | Path) -> tuple[Profile, dict]:
    """The profile and its details file, which must hold the raw proxy tables a calibration reads."""
    profile = load_profile(profile_path)
    dpath = details_path(Path(profile_path))
    if not dpath.is_file():
        raise InputError(f"{profile_path}: no details file {dpath.name}; calibration needs the raw proxy tables "
                         "that `python -m profiling run` writes beside the profile")
    details = read_json(dpath)[0]
    if not isinstance(details.get("proxy_raw"), dict) or not isinstance(details.get("groups"), dict):
        raise InputError(f"{dpath}: not a profiling details file (no proxy_raw / groups)")
    return profile, details


def run_calibrate(args) -> Calibration:  # noqa: ANN001 - the argparse namespace of ``python -m profiling calibrate``
    """The CLI: calibrate, write OUT and OUT's details file (the input's, plus ``calibration``)."""
    profile, details = read_profile_details(args.profile)
    probe = {"none": None, "auto": default_probe(profile)}.get(args.layer_probe, args.layer_probe)
    check_probe(probe, profile)
    out = Path(args.output)
    cal = Calibrator(profile, details, Path(args.model), args.max_tokens,
                     journal=out.with_name(out.name + ".calibration.jsonl"), resume=args.resume,
                     progress=not args.no_progress, say=print).run(probe, not args.no_format_correction)
    new = calibrated_profile(profile, cal, details["proxy_raw"], details["groups"], absorb=not args.keep_fixed_cells)
    digest = save_profile(new, out)
    details.update(profile=out.name, profile_hash=digest,
                   calibration={"link": cal.link.to_json(), "reference_format": cal.reference, "s_ref": cal.s_ref,
                                "scale": cal.scale, "tokens": cal.tokens, "seconds": cal.seconds, "rows": cal.rows,
                                # the single-effect profile it came from: refine also proposes its ILP plan
                                "source": {"path": str(args.profile), "hash": profile.hash}})
    write_json(details_path(out), details, indent=None)
    out.with_name(out.name + ".calibration.jsonl").unlink(missing_ok=True)
    print(f"p = {cal.link.p:.3f}; {len(cal.rows)} plans measured in {cal.seconds:.0f} s; uniform plans measured / "
          "predicted: " + ", ".join(f"{r['format']} {r['measured_kl']:.3g}/{r['predicted_kl']:.3g}"
                                    for r in cal.rows if r["plan"].startswith("uniform")))
    print(f"wrote {out} and {details_path(out)}")
    return cal
