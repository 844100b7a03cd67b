"""``python -m experiments report DIR``: report.md with tables and plots from a sweep's result rows.

    python -m experiments report experiments/results/r1 [-o experiments/results/r1/report.md]
    write_report(Path("experiments/results/r1"))  # -> .../report.md, plus kl_vs_bytes.png, ppl_vs_bytes.png

Reads ``DIR/cells.jsonl`` (:func:`experiments.runner.read_rows`; ``rows.csv`` is written by the runner) and,
per model, computes from the rows alone:

* the header: cells (ok / does not fit / failed), git commits, the evaluation protocol, how to reproduce;
* the main table, on the protocol most cells share (profile, eval corpus, split, tokens, quantizer): rows are
  budgets, columns methods, cells ``KL mean / perplexity`` with the lowest KL of each budget in bold; and the
  uniform formats (one plan each, placed at its own bytes);
* ``kl_vs_bytes.png`` and ``ppl_vs_bytes.png`` (plan bytes against KL mean / perplexity, log y, one series
  per method, the uniform formats as labelled points, the Pareto front dashed) and the Pareto front per method;
* the formulations of the joint ILP at equal budgets; the ablations (mixed precision alone, pruning alone,
  pruning + mixed precision, all three) with what each lever buys as a KL ratio;
* the headline: per uniform format, the smallest budget whose ``ilp (predicted_loss)`` plan is no worse in KL
  (and in perplexity) and its bytes ratio to the uniform plan; per budget, which methods beat that plan;
* the calibration shift (when the rows hold ILP plans from other profiles or on other corpora): profile domain
  (the profile file's stem) -> evaluation corpus, per budget.

Plots are written beside report.md (``-MODEL`` appended to their names when DIR holds several models) without
a timestamp or version in their metadata, so a rerun on the same rows gives the same bytes. Bad input (no DIR,
no rows, a row that is not a cell's) raises :class:`~optimizer.errors.InputError`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.budget import parse_bytes
from optimizer.errors import InputError

from .runner import CELLS_FILE, RESULTS, read_rows
from .sweeps._common import ABLATIONS, BASELINES, FORMULATIONS

Row = dict[str, Any]
ILP = "ilp (predicted_loss)"
#: method columns in this order (others after them, by name)
ORDER = ("refine",) + tuple(f"ilp ({f})" for f in FORMULATIONS) + ABLATIONS + BASELINES
#: the fields that make two cells comparable (the main tables use the most common combination)
PROTOCOL = ("profile", "eval_corpus", "eval_split", "eval_tokens", "quantizer", "apply")
NEEDED = ("model", "budget", "method", "status")
OK_NUMBERS = ("plan_bytes", "kl_mean", "perplexity")
ABLATION_COLUMNS = (("quantize_only", "mixed precision alone"), ("prune_only", "pruning alone"),
                    ("topk_only", "top-k alone"),
                    ("no_topk", "pruning + mixed precision"), (ILP, "all three"),
                    ("greedy", "baseline"), ("sequential", "baseline"))
PLOTS = (("kl_mean", "kl_vs_bytes", "KL mean to the original"), ("perplexity", "ppl_vs_bytes", "perplexity"))


def write_report(results_dir: Path, output: Path | None = None) -> Path:
    """Write report.md (default ``results_dir/report.md``) and its plots beside it; returns report.md's path."""
    results_dir = Path(results_dir)
    rows = load_rows(results_dir)
    output = Path(output) if output is not None else results_dir / "report.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[Row]] = {}
    for row in rows:
        by_model.setdefault(str(row["model"]), []).append(row)
    lines = _header(results_dir, rows)
    for name, model_rows in by_model.items():
        suffix = "" if len(by_model) == 1 else "-" + _slug(name)
        lines += ModelRows.build(name, model_rows).section(output.parent, suffix)
    output.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return output


def load_rows(results_dir: Path) -> list[Row]:
    """The rows of ``results_dir/cells.jsonl``, checked: each is a JSON object with a cell's fields."""
    path = Path(results_dir) / CELLS_FILE
    if not Path(results_dir).is_dir():
        raise InputError(f"DIR: {results_dir}: no such directory")
    try:
        rows = read_rows(results_dir)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {' '.join(str(exc).split())}") from None
    if not rows:
        what = "holds no JSON row" if path.is_file() else "does not exist"
        raise InputError(f"DIR: no results in {results_dir}: {CELLS_FILE} {what} "
                         "(run python -m experiments run SWEEP --out DIR first)")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in NEEDED if not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{path}: row {i}: missing or non-text field {missing[0]!r}")
        odd = [k for k in PROTOCOL + ("formulation",) if not isinstance(row.get(k), (str, int, float, type(None)))]
        if odd:
            raise InputError(f"{path}: row {i}: field {odd[0]!r} must be a text, a number or null")
        if row["status"] == "ok":
            bad = [k for k in OK_NUMBERS if not _is_number(row.get(k))]
            if bad:
                raise InputError(f"{path}: row {i}: an ok row needs a number in {bad[0]!r}, got {row.get(bad[0])!r}")
        parse_bytes(row["budget"], what=f"{path}: row {i}: budget")
    return rows


# ---------------------------------------------------------------------------------------------- helpers


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, spec: str = ".4g") -> str:
    return format(x, spec) if _is_number(x) else "-"


def _mb(n: Any) -> str:
    return f"{n / 1e6:.3f}" if _is_number(n) else "-"


def _ok(row: Row | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _status(row: Row | None) -> str:
    """What a table shows for a cell without numbers."""
    if row is None:
        return "-"
    status = str(row.get("status"))
    return "does not fit" if status == "does not fit" else "error" if status.startswith("error") else status


def _label(row: Row) -> str:
    """The method's column name: ``ilp (FORMULATION)``; other methods name a non-default formulation too."""
    method, formulation = row["method"], row.get("formulation") or "predicted_loss"
    if method == "ilp" or formulation != "predicted_loss":
        return f"{method} ({formulation})"
    return method


def _order(label: str) -> tuple[int, str]:
    return (ORDER.index(label), "") if label in ORDER else (len(ORDER), label)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name or text)


def _table(header: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body] + [""]


def _distinct(rows: Iterable[Row], key: str) -> str:
    values = list(dict.fromkeys(str(r.get(key)) for r in rows if r.get(key) is not None))
    return ", ".join(values) or "-"


def _counts(rows: list[Row]) -> str:
    c = Counter(_status(r) for r in rows)
    failed = len(rows) - c["ok"] - c["does not fit"]
    return f"{len(rows)} cells: {c['ok']} ok, {c['does not fit']} does not fit, {failed} failed"


def _header(results_dir: Path, rows: list[Row]) -> list[str]:
    name = results_dir.resolve().name
    sweep, smoke = (name[: -len("-smoke")], True) if name.endswith("-smoke") else (name, False)
    recorded = Counter(str(r["sweep"]) for r in rows if r.get("sweep"))  # rows name their sweep since it existed
    sweep = recorded.most_common(1)[0][0] if recorded else sweep
    out = "" if results_dir.resolve() == (RESULTS / name).resolve() else f" --out {results_dir}"
    shas = Counter(str(r.get("git_sha", "unknown")) for r in rows)
    return [f"# Sweep report: {sweep}", "",
            f"- Results: `{results_dir}` ({_counts(rows)})",
            "- Git commits: " + ", ".join(f"`{s}` ({n} cells)" for s, n in sorted(shas.items())),
            (f"- Reproduce: `python -m experiments run {sweep}{' --smoke' if smoke else ''}{out} --resume`, "
            f"then `python -m experiments report {results_dir}`"), ""]


def pareto(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The points (bytes, value, tag) no other point dominates (no more bytes and no higher value, one strictly
    better), by bytes."""
    front: list[tuple[float, float, Any]] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


# ---------------------------------------------------------------------------------------------- one model


@dataclass
class ModelRows:
    """One model's rows: the main protocol's cells by (budget, method), the uniform plans, the shift cells."""

    name: str
    rows: list[Row]
    main: list[Row]
    budgets: list[str]
    labels: list[str]
    cells: dict[tuple[str, str], Row]
    uniform: list[Row]
    shift: list[Row] = field(default_factory=list)

    @classmethod
    def build(cls, name: str, rows: list[Row]) -> ModelRows:
        protocol = Counter(tuple(r.get(k) for k in PROTOCOL) for r in rows).most_common(1)[0][0]
        main = [r for r in rows if tuple(r.get(k) for k in PROTOCOL) == protocol]
        cells: dict[tuple[str, str], Row] = {}
        for r in main:
            if r["method"].startswith("uniform:"):
                continue
            key = (r["budget"], _label(r))
            if key not in cells or (not _ok(cells[key]) and _ok(r)):
                cells[key] = r
        budgets = sorted({b for b, _ in cells}, key=parse_bytes)
        labels = sorted({m for _, m in cells}, key=_order)
        uniform = sorted((r for r in main if r["method"].startswith("uniform:")),
                         key=lambda r: (not _ok(r), r.get("plan_bytes") or 0, r["method"]))
        same = PROTOCOL.index("eval_split")
        shift = [r for r in rows if _label(r) == ILP and tuple(r.get(k) for k in PROTOCOL)[same:] == protocol[same:]]
        if all(tuple(r.get(k) for k in PROTOCOL) == protocol for r in shift):
            shift = []
        return cls(name, rows, main, budgets, labels, cells, uniform, shift)

    def at(self, budget: str, label: str) -> Row | None:
        return self.cells.get((budget, label))

    def section(self, out_dir: Path, suffix: str) -> list[str]:
        lines = self._intro()
        lines += self._main_table() + self._uniform_table() + self._plots(out_dir, suffix) + self._pareto()
        lines += self._formulations() + self._ablations() + self._handed_over() + self._headline() + self._losses()
        lines += self._shift() + self._failures()
        return lines

    def _handed_over(self) -> list[str]:
        """Per budget, which other methods' plans ``refine`` handed over (the same plan evaluates to the same
        KL, bit for bit: evaluation is deterministic), or that it is a plan of its own rounds."""
        if "refine" not in self.labels:
            return []
        body, own = [], 0
        for b in self.budgets:
            r = self.at(b, "refine")
            if not _ok(r):
                body.append([b, _status(r)])
                continue
            same = [m for m in self.labels
                    if m != "refine" and _ok(o := self.at(b, m)) and o["kl_mean"] == r["kl_mean"]]
            same += [u["method"] for u in self.uniform if _ok(u) and u["kl_mean"] == r["kl_mean"]]
            own += not same
            body.append([b, ", ".join(same) if same else "its own (a corrected-profile round)"])
        return (["### What refine handed over", "",
                 f"The plan of which other method (same KL, bit for bit), per budget; {own} of {len(body)} budgets "
                 "got a plan no other method found.", ""] + _table(["budget", "refine's plan is that of"], body))

    def _intro(self) -> list[str]:
        m = self.main[0]
        ok = [r for r in self.main if _ok(r)]
        placed = {id(r) for r in self.main + self.shift}
        other = sum(id(r) not in placed for r in self.rows)
        lines = [f"## {self.name}", "", f"- {_counts(self.rows)}",
                 (f"- Main tables: profile `{m.get('profile')}`, corpus `{m.get('eval_corpus')}`, split "
                 f"`{m.get('eval_split')}`, {m.get('eval_tokens')} tokens, window {_distinct(ok, 'window')}, "
                 f"quantizer `{m.get('quantizer')}`, {'written and reloaded' if m.get('apply') else 'in memory'}"),
                 "- The original's perplexity on the same tokens: "
                 + (", ".join(dict.fromkeys(_num(r.get('reference_perplexity'), '.2f') for r in ok)) or "-"),
                 f"- Git commits: {_distinct(self.rows, 'git_sha')}"]
        if other:
            lines.append(f"- {other} cells with another protocol are only in rows.csv")
        return lines + [""]

    def _main_table(self) -> list[str]:
        lines = ["### KL mean / perplexity by budget and method", "",
                 "Lowest KL mean of each budget in bold; plan bytes are at most the budget.", ""]
        body = []
        for b in self.budgets:
            best = min((r["kl_mean"] for m in self.labels if _ok(r := self.at(b, m))), default=None)
            cells = []
            for m in self.labels:
                r = self.at(b, m)
                text = f"{_num(r['kl_mean'])} / {_num(r['perplexity'], '.2f')}" if _ok(r) else _status(r)
                cells.append(f"**{text}**" if _ok(r) and r["kl_mean"] == best else text)
            body.append([b] + cells)
        return lines + _table(["budget"] + self.labels, body)

    def _uniform_table(self) -> list[str]:
        if not self.uniform:
            return []
        body = [[r["method"].partition(":")[2], _num(r.get("plan_bytes"), "d"), _mb(r.get("plan_bytes"))]
                + ([_num(r.get(k)) for k in ("kl_mean", "kl_median", "kl_p99", "top1_agreement")]
                   + [_num(r.get("perplexity"), ".2f")] if _ok(r) else [_status(r)] + ["-"] * 4)
                for r in self.uniform]
        return ["### Uniform formats (every block in one format, nothing pruned)", ""] + _table(
            ["format", "bytes", "MB", "KL mean", "KL median", "KL p99", "top-1 agreement", "perplexity"], body)

    def _series(self, metric: str) -> dict[str, list[tuple[float, float, str]]]:
        """method -> [(plan MB, metric, budget)] of its ok cells, by bytes; ``uniform`` -> its formats."""
        out: dict[str, list[tuple[float, float, str]]] = {}
        for m in self.labels:
            pts = [(r["plan_bytes"] / 1e6, r[metric], b) for b in self.budgets if _ok(r := self.at(b, m))]
            if pts:
                out[m] = sorted(pts)
        uni = [(r["plan_bytes"] / 1e6, r[metric], r["method"].partition(":")[2]) for r in self.uniform if _ok(r)]
        if uni:
            out["uniform"] = sorted(uni)
        return out

    def _plots(self, out_dir: Path, suffix: str) -> list[str]:
        lines = ["### Plots", ""]
        for metric, stem, ylabel in PLOTS:
            series = self._series(metric)
            if not series:
                return lines + ["No ok cells to plot.", ""]
            path = out_dir / f"{stem}{suffix}.png"
            _plot(series, ylabel, f"{self.name}: {ylabel} against plan bytes", path)
            lines.append(f"![{ylabel} against plan bytes]({path.name})")
        return lines + [""]

    def _pareto(self) -> list[str]:
        series = self._series("kl_mean")
        if not series:
            return []
        body = [[m, ", ".join(f"{tag} ({x:.3f} MB, KL {_num(y)})" for x, y, tag in pareto(pts))]
                for m, pts in series.items()]
        overall = pareto([(x, y, f"uniform:{tag}" if m == "uniform" else f"{m} @ {tag}")
                          for m, pts in series.items() for x, y, tag in pts])
        return (["### Pareto front in (plan bytes, KL mean)", "", ("Per method: the points no other point of the "
                 "same method dominates."), ""] + _table(["method", "front (budget or format: plan MB, KL mean)"], body)
                + ["All methods together:", ""]
                + _table(["plan MB", "KL mean", "method @ budget"], [[f"{x:.3f}", _num(y), t] for x, y, t in overall]))

    def _formulations(self) -> list[str]:
        labels = [m for m in self.labels if m.startswith("ilp (")]
        if not labels:
            return []
        body = []
        for b in self.budgets:
            best = min((r["kl_mean"] for m in labels if _ok(r := self.at(b, m))), default=None)
            for m in labels:
                r = self.at(b, m)
                kl = _num(r["kl_mean"]) if _ok(r) else _status(r)
                body.append([b, m[len("ilp ("):-1], _mb(r and r.get("plan_bytes")),
                             f"**{kl}**" if _ok(r) and r["kl_mean"] == best else kl,
                             _num(r and r.get("perplexity"), ".2f"), _num(r and r.get("predicted_loss")),
                             str((r or {}).get("solve_status") or "-")])
        return (["### ILP formulations at equal budgets", "",
                 "Lowest KL per budget in bold. Each formulation's predicted loss is in its own units.", ""]
                + _table(["budget", "formulation", "plan MB", "KL mean", "perplexity", "predicted loss",
                          "solve status"], body))

    def _ablations(self) -> list[str]:
        prune = next((m for m in self.labels if m.startswith("prune_only")), None)
        topk = next((m for m in self.labels if m.startswith("topk_only")), None)
        names = {k: v for k, v in (("prune_only", prune), ("topk_only", topk)) if v}
        if not any(m in self.labels for m in ("quantize_only", "no_topk")) and not names:
            return []
        cols = [(names.get(m, m), why) for m, why in ABLATION_COLUMNS if names.get(m, m) in self.labels]
        ratios = [(what, num, den) for what, num, den in (
            ("top-k buys", "no_topk", ILP), ("pruning buys", "quantize_only", "no_topk"),
            ("mixed precision buys", prune, "no_topk")) if num in self.labels and den in self.labels]
        body = []
        for b in self.budgets:
            kl = [_num(r["kl_mean"]) if _ok(r := self.at(b, m)) else _status(r) for m, _ in cols]
            body.append([b] + kl + [self._ratio(b, num, den) for _, num, den in ratios])
        return (["### Ablations: what pruning, top-k and mixed precision each buy (KL mean)", "",
                 "A lever's gain is the KL ratio without it / with it (above 1: the lever lowers KL).", ""]
                + _table(["budget"] + [f"{m} ({why})" for m, why in cols]
                         + [f"{what} ({num} / {den})" for what, num, den in ratios], body))

    def _ratio(self, budget: str, num: str, den: str) -> str:
        a, b = self.at(budget, num), self.at(budget, den)
        if not (_ok(a) and _ok(b)) or b["kl_mean"] <= 0:
            return "-"
        return f"{a['kl_mean'] / b['kl_mean']:.2f}x"

    @property
    def handed(self) -> str:
        """The plan the pipeline hands over: ``refine``'s when the sweep has it, else the ILP's."""
        return "refine" if "refine" in self.labels else ILP

    def _headline(self) -> list[str]:
        uniform = [u for u in self.uniform if _ok(u)]
        handed = self.handed
        if not uniform or handed not in self.labels:
            return []
        ilp = [(b, r) for b in self.budgets if _ok(r := self.at(b, handed))]
        body = []
        for u in uniform:
            cells = [u["method"].partition(":")[2], _mb(u["plan_bytes"])]
            for metric in ("kl_mean", "perplexity"):
                b, r = next(((b, r) for b, r in ilp if r[metric] <= u[metric]), (None, None))
                cells += ([b, _mb(r["plan_bytes"]), f"{r['plan_bytes'] / u['plan_bytes']:.3f}"] if r
                          else ["never", "-", "-"])
            body.append(cells)
        return ([f"### Headline: the smallest budget whose `{handed}` plan matches a uniform format", "",
                 (f"Per uniform format: the smallest budget whose `{handed}` plan has no higher KL mean "
                 "(then: no higher perplexity) than the uniform plan, and that plan's bytes / the uniform "
                 "plan's bytes."), ""]
                + _table(["format", "uniform MB", "budget (KL)", "plan MB", "bytes ratio (KL)", "budget (perplexity)",
                          "plan MB", "bytes ratio (perplexity)"], body))

    def _losses(self) -> list[str]:
        ILP = self.handed  # noqa: N806 - the plan the pipeline hands over
        if ILP not in self.labels:
            return []
        lines = [f"Where `{ILP}` loses at a budget (other methods there, and uniform plans that fit it):", ""]
        for b in self.budgets:
            r = self.at(b, ILP)
            if not _ok(r):
                lines.append(f"- {b}: `{ILP}`: {_status(r)}")
                continue
            rivals = [(m, o) for m in self.labels if m != ILP and _ok(o := self.at(b, m))]
            rivals += [(u["method"], u) for u in self.uniform if _ok(u) and u["plan_bytes"] <= parse_bytes(b)]
            said = []
            for metric, what, spec in (("kl_mean", "KL mean", ".4g"), ("perplexity", "perplexity", ".2f")):
                wins = sorted((o[metric], m) for m, o in rivals if o[metric] < r[metric])
                if wins:
                    said.append(f"in {what} ({_num(r[metric], spec)}) to "
                                + ", ".join(f"{m} ({_num(v, spec)})" for v, m in wins))
            lines.append(f"- {b}: " + ("loses " + "; ".join(said) if said
                                       else f"best in KL mean and perplexity of {len(rivals) + 1} plans"))
        return lines + [""]

    def _shift(self) -> list[str]:
        if not self.shift:
            return []
        cells: dict[tuple[str, str], Row] = {}
        for r in self.shift:
            key = (r["budget"], f"{Path(str(r['profile'])).stem} -> {r['eval_corpus']}")
            if key not in cells or (not _ok(cells[key]) and _ok(r)):
                cells[key] = r
        budgets = sorted({b for b, _ in cells}, key=parse_bytes)
        pairs = sorted({p for _, p in cells})
        body = [[b] + [f"{_num(r['kl_mean'])} / {_num(r['perplexity'], '.2f')}" if _ok(r := cells.get((b, p)))
                       else _status(r) for p in pairs] for b in budgets]
        return (["### Calibration shift", "",
                 (f"`{ILP}` plans from a profile calibrated on one domain (profile file name), evaluated on each "
                 "corpus: KL mean / perplexity."), ""] + _table(["budget"] + pairs, body))

    def _failures(self) -> list[str]:
        failed = [r for r in self.rows if _status(r) not in ("ok", "does not fit")]
        if not failed:
            return []
        return ["### Failed cells", ""] + _table(
            ["method", "budget", "profile", "corpus", "status"],
            [[_label(r), r["budget"], str(r.get("profile")), str(r.get("eval_corpus")),
              str(r["status"]).replace("|", "/")] for r in failed])


def _plot(series: dict[str, list[tuple[float, float, str]]], ylabel: str, title: str, path: Path) -> None:
    """One line + markers per method, the uniform formats as labelled squares, the Pareto front dashed; log y."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "ovD^<>pP*hX"
    for i, (method, pts) in enumerate(series.items()):
        pts = [p for p in pts if p[1] > 0]  # log scale
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if method == "uniform":
            ax.scatter(xs, ys, marker="s", color="black", label="uniform", zorder=3)
            for x, y, fmt in pts:
                ax.annotate(fmt, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=method)
    front = pareto([p for pts in series.values() for p in pts if p[1] > 0])
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", linestyle="--", color="grey",
                linewidth=1, label="Pareto front")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("plan bytes (MB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, format="png", metadata={"Software": None})
