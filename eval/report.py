"""`python -m eval report RUN... --out DIR`: the paper's Table 1, equal-budget columns and plots.

Runs are grouped into *variants* (the config minus seed, output folder, run length and settings
that do not change the model); a variant's runs are seeds, shown as mean ± sample std (ddof 1).
Only measured points are reported: a budget column takes each run's last evaluation at or below
the budget (the largest value every run with points reached), never an interpolated value.
Epochs are ``step / steps_per_epoch``. Plots are in `eval/plots.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval import plots
from eval.features import EXTRACTORS
from eval.plots import fmt_axis, mean_std, table
from eval.runs import EVALS_DIR, RunError, check_out_dir, read_config
from shards_spec.atomic import atomic_write_text
from train.metrics import METRICS_NAME, read_metrics
from train.objectives import WINDOW_METHODS
from train.options import (
    LEGACY_DEFAULTS,
    NOT_VARIANT,  # config.json keys that do not make another variant
)

TITLES = {
    "inception": "FID (inception extractor)",
    "offline": "Frechet distance (offline extractor, not FID)",
}
SHORT = {"inception": "FID", "offline": "offline Frechet distance"}
AXES = ("epochs", "images", "wall")
METHOD_ORDER = ("iid", "seq", "adjacent", "dispersive", "flow", "divergence")
SYMBOLS = {"lam": "λ", "sigma": "σ", "sigma_div": "σ_div", "delta": "δ"}
LABEL_FIRST = ("lam", "sigma", "sigma_div", "batch", "preset", "image_size")
PAPER = (  # Table 1 of the paper: method, FID train, FID val
    "iid (baseline) 4.02 11.74|seq 3.98 11.70|adjacent 4.59 11.67|dispersive 4.68 12.25|"
    "flow (ours) 3.02 10.87|divergence (ours) 3.31 11.23"
)


class ReportError(RunError):
    """A folder that cannot be reported on (one-line message); a ValueError."""


@dataclass
class Run:
    """One training run: its config, metrics (as the last resume saw them) and evaluations."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        """The run's seed (None when config.json has none)."""
        return self.config.get("seed")

    @property
    def method(self) -> str:
        """The training method."""
        return str(self.config.get("method", "?"))

    def x(self, rec: dict[str, Any], axis: str) -> float | None:
        """A record's position on `axis` (steps, epochs, images or wall); None if unrecorded."""
        step = rec.get("step")
        if axis == "steps":
            return step
        if axis == "epochs":
            spe = self.config.get("steps_per_epoch")
            return step / spe if spe and step is not None else rec.get("epoch")
        return rec.get("images" if axis == "images" else "wall_s")

    def kind(self, kind: str | None) -> list[dict[str, Any]]:
        """Records of a kind (None: the per-step records), in step order."""
        return [r for r in self.records if r.get("kind") == kind and r.get("step") is not None]

    def fid_points(self, extractor: str, split: str) -> list[dict[str, Any]]:
        """This run's evaluations of an extractor and split with a value, in step order."""
        pts = [
            e
            for e in self.evals
            if e.get("extractor") == extractor and e.get("split") == split and _num(e.get("fid"))
        ]
        return sorted(pts, key=lambda e: e["step"])


@dataclass
class Variant:
    """Runs that differ only by seed (and run length)."""

    key: tuple[tuple[str, str], ...]
    runs: list[Run]
    label: str = ""
    step_matched: bool = False
    color: str = "C0"

    @property
    def method(self) -> str:
        """The variant's method."""
        return self.runs[0].method


def _fid(e: dict | None) -> float | None:
    return None if e is None else e["fid"]


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def load_run(path: Path) -> Run:
    """Read a run folder; ReportError when it is not a training run."""
    try:
        config = read_config(path)
    except RunError as exc:
        raise ReportError(str(exc)) from None
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    if (path / METRICS_NAME).is_file():
        records = read_metrics(path)
        if not records:
            notes.append(f"{METRICS_NAME} is empty")
    else:
        notes.append(f"no {METRICS_NAME}")
    evals = _read_evals(path, notes)
    return Run(path=path, config=config, records=records, evals=evals, notes=notes)


def _read_evals(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    evals = []
    for file in sorted((path / EVALS_DIR).glob("*.json")):
        if file.name.startswith("."):
            continue  # a temporary file of an evaluation being written
        try:
            ev = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            why = "does not parse" if isinstance(exc, ValueError) else f"unreadable ({exc})"
            notes.append(f"{EVALS_DIR}/{file.name} {why} (skipped)")
            print(f"warning: {file}: {why}; skipped", file=sys.stderr)
            continue
        why = malformed(ev)
        if why is None:
            evals.append(ev)
        else:
            notes.append(f"{EVALS_DIR}/{file.name} {why} (skipped)")
            print(f"warning: {file}: {why}; skipped", file=sys.stderr)
    return evals


# the fields of an evaluation the report reads, and what each must be (None is allowed where
# the field is optional)
_NUMBERS = ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage", "epoch",
            "images", "wall_s")  # fmt: skip
_COUNTS = ("n_samples", "n_ref")


def malformed(ev: Any) -> str | None:
    """What is wrong with an evaluation record, in words (None: it can be reported)."""
    if not isinstance(ev, dict):
        return f"is not a JSON object (a {type(ev).__name__})"
    missing = [k for k in ("step", "split", "extractor") if k not in ev]
    if missing:
        return f"lacks {'/'.join(missing)}"
    step = ev["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"has step {step!r}, not a step number"
    for key in ("split", "extractor"):
        if not isinstance(ev[key], str):
            return f"has {key} {ev[key]!r}, not a name"
    for key in _NUMBERS:
        value = ev.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"has {key} {value!r}, not a number"
    for key in _COUNTS:
        value = ev.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"has {key} {value!r}, not a count"
    return None


def variant_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The config items that make a variant, as sorted (key, JSON value) pairs. A key an older
    config.json lacks counts as the value it meant then (``LEGACY_DEFAULTS``), so a run from
    before an option existed is the same variant as a new run that leaves it at that value."""
    config = {**LEGACY_DEFAULTS, **config}
    items = (k for k in config if k not in NOT_VARIANT)
    return tuple(sorted((k, json.dumps(config[k], sort_keys=True)) for k in items))


def group(runs: list[Run]) -> list[Variant]:
    """Variants of the runs, labelled, coloured and in the paper's method order."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        by_key.setdefault(variant_key(run.config), []).append(run)
    variants = [Variant(k, sorted(rs, key=_seed_order)) for k, rs in by_key.items()]
    matched = {
        len(v.runs[0].config.get("frames") or []) * (v.runs[0].config.get("batch") or 0)
        for v in variants
        if v.method in WINDOW_METHODS
    }
    for v in variants:
        v.step_matched = v.method == "iid" and v.runs[0].config.get("batch") in matched
    _label(variants)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    variants.sort(key=lambda v: (rank.get(v.method, len(rank)), v.step_matched, v.label))
    for i, v in enumerate(variants):
        v.color = f"C{i % 10}"
    return variants


def _seed_order(run: Run) -> tuple:
    seed = run.seed
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _label(variants: list[Variant]) -> None:
    families: dict[tuple[str, bool], list[Variant]] = {}
    for v in variants:
        families.setdefault((v.method, v.step_matched), []).append(v)
    for (method, matched), family in families.items():
        keys = sorted({k for v in family for k, _ in v.key}, key=_key_order)
        differ = [k for k in keys if len({dict(v.key).get(k) for v in family}) > 1]
        for v in family:
            items = dict(v.key)
            parts = [f"{SYMBOLS.get(k, k)}={_show(items.get(k))}" for k in differ]
            v.label = " ".join([method + (" (step-matched)" if matched else ""), *parts])


def _key_order(key: str) -> tuple[int, str]:
    return (LABEL_FIRST.index(key) if key in LABEL_FIRST else len(LABEL_FIRST), key)


def _show(raw: str | None) -> str:
    value = None if raw is None else json.loads(raw)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(str(x) for x in value)
    return "none" if value is None else str(value)


# --- cells -------------------------------------------------------------------------------------


def points_used(pairs: list[tuple[Run, dict | None]], axis: str) -> str:
    """Which evaluation point each seed contributed: ``step N (position)``, per seed."""
    texts = [f"step {p['step']} ({fmt_axis(r.x(p, axis), axis)})" if p else "—" for r, p in pairs]
    if len(pairs) == 1:
        return texts[0]
    return "; ".join(f"s{r.seed}: {t}" for (r, _), t in zip(pairs, texts, strict=True))


def seeds_cell(v: Variant) -> str:
    """Number of seeds and which."""
    return f"{len(v.runs)} ({', '.join(str(r.seed) for r in v.runs)})"


# --- selection of points ------------------------------------------------------------------------


def best_eval(run: Run, extractor: str) -> dict | None:
    """The val evaluation with the lowest value (the earliest on a tie), or None."""
    vals = run.fid_points(extractor, "val")
    return min(vals, key=lambda e: (e["fid"], e["step"])) if vals else None


def eval_at(run: Run, extractor: str, split: str, step: int) -> dict | None:
    """The evaluation of a split at exactly `step`, or None."""
    return next((e for e in run.fid_points(extractor, split) if e["step"] == step), None)


def budget(runs: list[Run], points: dict[int, list[dict]], axis: str) -> float | None:
    """The largest position on `axis` every run with points reached (None: no points)."""
    reached = [
        max(xs)
        for r in runs
        if (xs := [x for p in points[id(r)] if (x := r.x(p, axis)) is not None])
    ]
    return min(reached) if reached else None


def at_or_below(run: Run, pts: list[dict], axis: str, limit: float | None) -> dict | None:
    """The run's last point at or below `limit` on `axis` (None when there is none)."""
    if limit is None:
        return None
    tol = abs(limit) * 1e-9 + 1e-12
    below = [p for p in pts if (x := run.x(p, axis)) is not None and x <= limit + tol]
    return max(below, key=lambda p: p["step"]) if below else None


# --- tables -------------------------------------------------------------------------------------


def fid_table(variants: list[Variant], extractor: str) -> list[str]:
    """Table 1 of one extractor: best checkpoint and equal epochs / images / wall-clock."""
    name, runs = SHORT.get(extractor, extractor), [r for v in variants for r in v.runs]
    val_pts = {id(r): r.fid_points(extractor, "val") for r in runs}
    limits = {axis: budget(runs, val_pts, axis) for axis in AXES}
    header = ["variant", "seeds", f"{name} train", f"{name} val", "best at (step, epoch)"]
    for axis in AXES:
        at = fmt_axis(limits[axis], axis)
        header += [f"train @ {at}", f"val @ {at}", f"point used @ {at}"]
    rows = []
    for v in variants:
        n, best = len(v.runs), [(r, best_eval(r, extractor)) for r in v.runs]
        row = [v.label, seeds_cell(v)]
        row += [
            mean_std([_fid(b and eval_at(r, extractor, "train", b["step"])) for r, b in best], n)
        ]
        row += [mean_std([_fid(b) for _, b in best], n), points_used(best, "epochs")]
        for axis in AXES:
            used = [(r, at_or_below(r, val_pts[id(r)], axis, limits[axis])) for r in v.runs]
            train = [_fid(p and eval_at(r, extractor, "train", p["step"])) for r, p in used]
            row += [mean_std(train, n), mean_std([_fid(p) for _, p in used], n)]
            row.append(points_used(used, axis))
        rows.append(row)
    return table(header, rows)


def missing_fid(variants: list[Variant], extractor: str) -> list[str]:
    """One line per run without val points of the extractor."""
    lines = []
    for v in variants:
        for r in v.runs:
            if r.fid_points(extractor, "val"):
                continue
            train = r.fid_points(extractor, "train")
            why = "train split only" if train else f"no {EVALS_DIR}/*-val-{extractor}.json"
            lines.append(
                f"- `{r.path}` ({v.label}, seed {r.seed}): no {SHORT.get(extractor, extractor)} "
                f"points ({why})"
            )
    return lines


def sample_counts(variants: list[Variant], extractor: str) -> str:
    """The sample / reference counts behind the values (a warning when they differ)."""
    pairs = {
        (e.get("n_samples"), e.get("n_ref"))
        for v in variants
        for r in v.runs
        for e in r.evals
        if e.get("extractor") == extractor
    }
    if not pairs:
        return "No evaluations of this extractor."
    text = ", ".join(f"{s} samples vs {ref} reference" for s, ref in sorted(pairs, key=str))
    if len(pairs) > 1:
        return f"Sample counts differ between evaluations ({text}): values are not comparable."
    return f"Each evaluation: {text}."


def prdc_table(variants: list[Variant], extractor: str) -> list[str]:
    """Precision / recall / density / coverage and KID of the val split at the best checkpoint."""
    keys = ("precision", "recall", "density", "coverage", "kid")
    rows = []
    for v in variants:
        best = [(r, best_eval(r, extractor)) for r in v.runs]
        cells = [
            mean_std([b.get(k) if b and _num(b.get(k)) else None for _, b in best], len(v.runs))
            for k in keys
        ]
        rows.append([v.label, seeds_cell(v), points_used(best, "epochs"), *cells])
    return table(["variant", "seeds", "best at", *keys], rows)


def val_loss_table(variants: list[Variant]) -> list[str]:
    """Final and minimum EMA validation loss, overall and at equal epochs / images / wall."""
    runs = [r for v in variants for r in v.runs]
    pts = {id(r): [p for p in r.kind("val") if _num(p.get("val_loss_ema"))] for r in runs}
    limits = {axis: budget(runs, pts, axis) for axis in AXES}
    header = ["variant", "seeds", "final / min (whole run)"]
    for axis in AXES:
        at = fmt_axis(limits[axis], axis)
        header += [f"final / min @ {at}", f"point used @ {at}"]
    rows = []
    for v in variants:
        n, row = len(v.runs), [v.label, seeds_cell(v)]
        for axis in (None, *AXES):
            used, mins = [], []
            for r in v.runs:
                own = pts[id(r)]
                if axis is not None:
                    last = at_or_below(r, own, axis, limits[axis])
                    own = [p for p in own if last and p["step"] <= last["step"]]
                used.append((r, own[-1] if own else None))
                mins.append(min(p["val_loss_ema"] for p in own) if own else None)
            final = [p["val_loss_ema"] if p else None for _, p in used]
            row.append(f"{mean_std(final, n, 4)} / {mean_std(mins, n, 4)}")
            if axis is not None:
                row.append(points_used(used, axis))
        rows.append(row)
    return table(header, rows)


def runs_table(variants: list[Variant]) -> list[str]:
    """One row per run: what it holds."""
    rows = []
    for v in variants:
        for r in v.runs:
            last = r.kind(None)[-1] if r.kind(None) else None
            counts = Counter(f"{e['extractor']} {e['split']}" for e in r.evals)
            evals = ", ".join(f"{k}: {c}" for k, c in sorted(counts.items())) or "none"
            where = [fmt_axis(r.x(last, a), a) if last else "—" for a in ("steps", *AXES)]
            rows.append([f"`{r.path}`", v.label, str(r.seed), *where, evals, "; ".join(r.notes)])
    header = ["run", "variant", "seed", "last step", "epochs", "images", "wall-clock"]
    return table([*header, "evaluations", "notes"], rows)


def paper_table() -> list[str]:
    """The paper's Table 1, for reference."""
    rows = [row.rsplit(" ", 2) for row in PAPER.split("|")]
    return table(["method (paper)", "FID train", "FID val"], rows)


# --- the report ---------------------------------------------------------------------------------


def _extractors(runs: list[Run]) -> list[str]:
    found = {e["extractor"] for r in runs for e in r.evals}
    ordered = [e for e in EXTRACTORS if e in found] + sorted(found - set(EXTRACTORS))
    return ordered or ["inception"]


def title(extractor: str) -> str:
    """The metric's name for an extractor's tables and plots."""
    return TITLES.get(extractor, f"Frechet distance ({extractor} extractor)")


def extractor_section(variants: list[Variant], extractor: str) -> list[str]:
    """Table 1, the missing points and P/R/D/C of one extractor."""
    name = title(extractor)
    lines = [f"## Table 1 — {name}", ""]
    lines += [
        "Best: each run's checkpoint with the lowest val value; train is taken at that step. "
        "Equal budgets: the largest epochs / images / wall-clock every run with points reached; "
        "each run's last evaluation at or below it (the point used is named). "
        "Mean ± std over seeds; (n=k): only k seeds have the value; —: not measured.",
        "",
        *fid_table(variants, extractor),
        "",
        *missing_fid(variants, extractor),
        "",
        sample_counts(variants, extractor),
        "",
        f"### Precision / recall / density / coverage — {name}",
        "",
        "Val split at the best checkpoint.",
        "",
        *prdc_table(variants, extractor),
        "",
    ]
    return lines


def distinct_runs(runs: list[Path]) -> list[Path]:
    """The run folders, each once: one given twice (another path, a symlink) is one run, with a
    warning, not two seeds."""
    first: dict[Path, Path] = {}
    for given in map(Path, runs):
        real = given.resolve()
        if real in first:
            print(f"warning: {given} is the run folder {first[real]} again; counted once",
                  file=sys.stderr)  # fmt: skip
            continue
        first[real] = given
    return list(first.values())


def make_report(runs: list[Path], out: Path, extractor: str | None = None) -> Path:
    """Write ``out/report.md`` and its PNG plots for the run folders; return report.md."""
    paths = distinct_runs(runs)
    if not paths:
        raise ReportError("no run folders given")
    out = Path(out)
    try:
        check_out_dir(out)
    except RunError as exc:
        raise ReportError(str(exc)) from None
    loaded = [load_run(p) for p in paths]
    variants = group(loaded)
    extractors = [extractor] if extractor else _extractors(loaded)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot make the folder ({exc})") from None
    lines = ["# Training report", "", f"{len(loaded)} runs in {len(variants)} variants.", ""]
    lines += ["## Runs", "", *runs_table(variants), ""]
    for ext in extractors:
        lines += extractor_section(variants, ext)
    lines += ["## Validation loss (EMA), from metrics.jsonl", "", *val_loss_table(variants), ""]
    names = {e: (title(e), SHORT.get(e, e)) for e in extractors}
    lines += plots.section(variants, out, names)
    lines += ["## The paper's Table 1 (reference; 50k samples, its own setting)", ""]
    lines += [*paper_table(), ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m eval report``."""
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="training runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and PNGs")
    parser.add_argument(
        "--extractor", choices=EXTRACTORS, default=None, help="only this extractor's evaluations"
    )


def run(args: argparse.Namespace) -> int:
    """Write the report; a folder that is not a run is one line on stderr (exit code 2)."""
    try:
        report = make_report(args.runs, args.out, args.extractor)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0
