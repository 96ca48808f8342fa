"""A study's answers in numbers: ``DIR/results.md``, ``results.json``, ``curves.json`` (every
run's measured curves, small enough to commit) and ``DIR/study-*.png``.

Everything here is read from the cells' run folders (metrics.jsonl, evals/) and is measured,
never interpolated: a run "reaches" a level at its first validation point at or below it, so a
reach is resolved to the validation interval (the study's ``val_points`` per budget).

The study's ``[questions]`` table names the cells the comparisons use::

    baseline = "iid"              # the paper's baseline
    step_matched = "iid-matched"  # iid with K x the window batch: same steps and frames per step
    method = "flow"               # the method under test
    adjacent = "adjacent"         # the same regulariser with w = 1
    seq = "seq"                   # ordered windows, independent noise, no regulariser
    lambdas = ["flow-lam0.1", "flow", "flow-lam10"]
    readings = ["flow", "flow-public"]  # the method as its paper's text and its public code run it
    split = "train"               # the frames the sample metrics are read against (default val)

Cells it does not name are still in the per-cell table; a name that is not a cell is refused when
the study file is read.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from shards_spec.atomic import atomic_write_text

from . import plots
from .plots import fmt_axis, mean_std, table
from .report import SHORT, Run, Variant, load_run
from .study_file import cell_seeds

AXES = ("epochs", "images", "wall")
AXIS_WORDS = {"steps": "steps", "epochs": "epochs", "images": "images", "wall": "wall-clock"}
LEVEL_FRACTIONS = (
    0.25,
    0.5,
    0.75,
    1.0,
)  # the reference's val loss at these fractions of its points
KEY = "val_loss_ema"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def val_points(run: Run) -> list[dict[str, Any]]:
    """The run's validation records with a value, in step order."""
    return [p for p in run.kind("val") if _finite(p.get(KEY))]


@dataclass(frozen=True)
class Measure:
    """A curve a speed-up is measured on (lower is better): its points per run and their key."""

    label: str  # as the tables name it
    points: Callable[[Run], list[dict[str, Any]]]
    key: str


VAL_LOSS = Measure("EMA validation loss", val_points, KEY)


@dataclass(frozen=True)
class Scores:
    """Which evaluations the answers read: an extractor's, against one split's frames."""

    extractor: str
    split: str = "val"

    @property
    def fd(self) -> str:
        """``offline FD (train)``: a column header."""
        return f"{SHORT.get(self.extractor, self.extractor)} ({self.split})"

    def points(self, run: Run) -> list[dict[str, Any]]:
        return run.fid_points(self.extractor, self.split)

    def final(self, run: Run, key: str) -> float | None:
        pts = self.points(run)
        return pts[-1].get(key) if pts and _finite(pts[-1].get(key)) else None


def fd_measure(scores: Scores) -> Measure:
    """The Frechet distance of the samples at the evaluation points."""
    return Measure(f"{scores.fd} of samples", scores.points, "fid")


def reach(run: Run, level: float, axis: str, m: Measure = VAL_LOSS) -> float | None:
    """Where the run first measured `m` at or below `level` (None: never)."""
    for p in m.points(run):
        if p[m.key] <= level:
            return run.x(p, axis)
    return None


def levels(ref: list[Run], m: Measure = VAL_LOSS) -> list[tuple[str, int, float]]:
    """Target values: (label, point index, level) at fractions of the reference's points of `m`.

    The level is the mean over the reference's seeds (those with points) of their value at that
    point; the reference's position for it is, by definition, where it measured that point.
    """
    curves = [c for r in ref if (c := m.points(r))]
    n = min((len(c) for c in curves), default=0)
    out = []
    for frac in LEVEL_FRACTIONS:
        i = max(0, int(frac * n + 0.5) - 1)
        if n == 0 or any(i == j for _, j, _ in out):
            continue
        out.append(
            (f"{frac:.0%} (point {i + 1}/{n})", i, statistics.fmean(c[i][m.key] for c in curves))
        )
    return out


def speedup(
    ref: list[Run], index: int, other: list[Run], level: float, axis: str, m: Measure = VAL_LOSS
) -> dict[str, Any]:
    """How much sooner `other` reaches `level` than the reference's point `index`, on `axis`.

    The ratio is (mean reference position) / (mean position of the other's seeds); ``pairs`` are
    the ratios of every (reference seed, other seed) pair, the spread shown. A seed of `other`
    that never reaches the level gives no ratio (``None``), named as not reached.
    """
    xb = [r.x(pts[index], axis) for r in ref if len(pts := m.points(r)) > index]
    xo = [reach(r, level, axis, m) for r in other]
    out: dict[str, Any] = {"base_x": xb, "other_x": xo, "ratio": None, "pairs": []}
    have = [x for x in xb + xo if x is not None]
    if xb and xo and len(have) == len(xb) + len(xo) and all(x > 0 for x in have):
        out["ratio"] = statistics.fmean(xb) / statistics.fmean(xo)
        out["pairs"] = [b / o for b, o in product(xb, xo)]
    return out


def fmt_speedup(s: dict[str, Any], axis: str) -> str:
    """``2.10x (1.9–2.3)`` or why there is no ratio."""
    if s["ratio"] is None:
        missed = sum(x is None for x in s["other_x"])
        return f"not reached by {missed} of {len(s['other_x'])} seeds" if missed else "—"
    lo, hi = min(s["pairs"]), max(s["pairs"])
    xs = ", ".join(fmt_axis(x, axis) for x in s["other_x"])
    return f"{s['ratio']:.2f}x ({lo:.2f}–{hi:.2f}; at {xs})"


def final_val(run: Run) -> float | None:
    pts = val_points(run)
    return pts[-1][KEY] if pts else None


def step_records(run: Run) -> list[dict[str, Any]]:
    return run.kind(None)


def reg_ratio_records(run: Run) -> list[dict[str, Any]]:
    """Per-step records with ``reg_ratio`` = reg / denoise and ``reg_share`` = lam*reg/loss."""
    lam = run.config.get("lam") or 0.0
    out = []
    for r in step_records(run):
        reg, den, loss = r.get("reg"), r.get("denoise"), r.get("loss")
        if _finite(reg) and _finite(den) and den > 0 and _finite(loss) and loss > 0:
            out.append({**r, "reg_ratio": reg / den, "reg_share": lam * reg / loss})
    return out


def tail_mean(records: list[dict[str, Any]], key: str, frac: float = 0.25) -> float | None:
    """Mean of `key` over the last `frac` of the records."""
    vals = [r[key] for r in records if _finite(r.get(key))]
    if not vals:
        return None
    return statistics.fmean(vals[-max(1, int(len(vals) * frac)) :])


def grad_var_mean(run: Run) -> float | None:
    return _mean([d["grad_var"] for d in run.kind("diag") if _finite(d.get("grad_var"))])


# --- the cells ---------------------------------------------------------------------------------


def load_cells(cells) -> dict[str, list[Run]]:
    """Cell name -> its seeds' runs (those with a run folder)."""
    out: dict[str, list[Run]] = {}
    for cell in cells:
        if (cell.run / "config.json").is_file():
            out.setdefault(cell.name, []).append(load_run(cell.run))
        else:
            out.setdefault(cell.name, [])
    return out


def variants(by_cell: dict[str, list[Run]], names: list[str]) -> list[Variant]:
    """Plot variants for named cells (label = cell name), in the given order."""
    out = []
    for i, name in enumerate(n for n in names if by_cell.get(n)):
        out.append(Variant((), by_cell[name], label=name, color=f"C{i % 10}"))
    return out


def cell_table(study, by_cell: dict[str, list[Run]], scores: Scores) -> list[str]:
    """One row per cell: what it ran and where it ended, mean ± std over seeds."""
    header = ["cell", "method", "seeds", "steps", "images", "epochs", "wall-clock",
              "val loss (EMA)", scores.fd, "precision", "recall", "evaluations"]  # fmt: skip
    rows = []
    for c in study.grid:
        runs = by_cell.get(c["name"], [])
        n = len(cell_seeds(study, c))
        last = [step_records(r)[-1] if step_records(r) else None for r in runs]
        where = []
        for axis in ("steps", "images", "epochs", "wall"):
            xs = [r.x(rec, axis) for r, rec in zip(runs, last, strict=True) if rec]
            where.append(fmt_axis(_mean(xs), axis) if xs and axis != "steps" else str(xs[0]) if xs else "—")  # fmt: skip
        evals = [len(scores.points(r)) for r in runs]
        missing = "missing" if not runs or not any(evals) else f"{min(evals)}–{max(evals)} points"
        rows.append([
            c["name"], c["method"], f"{len(runs)}/{n}", *where,
            mean_std([final_val(r) for r in runs], n, 4),
            mean_std([scores.final(r, "fid") for r in runs], n),
            mean_std([scores.final(r, "precision") for r in runs], n),
            mean_std([scores.final(r, "recall") for r in runs], n),
            missing,
        ])  # fmt: skip
    return table(header, rows)


def _fraction(run: Run, step: int) -> float:
    total = run.config.get("total_steps") or step
    return round(step / total, 2) if total else 0.0


def fd_curve_table(names: list[str], by_cell: dict[str, list[Run]], scores: Scores) -> list[str]:
    """The val Frechet distance at each evaluation point (as a fraction of each run's steps),
    per cell: mean ± std over the seeds that have that point."""
    fracs = sorted(
        {
            _fraction(r, p["step"])
            for n in names
            for r in by_cell.get(n, [])
            for p in scores.points(r)
        }
    )
    if not fracs:
        return ["No evaluation points."]
    rows = []
    for name in names:
        runs = by_cell.get(name, [])
        at = [{_fraction(r, p["step"]): p["fid"] for p in scores.points(r)} for r in runs]
        rows.append([name, *[mean_std([a.get(f) for a in at], len(runs)) for f in fracs]])
    return table(["cell", *[f"at {f:.0%} of the budget" for f in fracs]], rows)


# --- the answers -------------------------------------------------------------------------------


@dataclass
class Section:
    """One answer of results.md: its markdown lines and the numbers results.json records."""

    markdown: list[str]
    values: dict[str, Any] = field(default_factory=dict)


def speed_section(questions: dict, by_cell, scores: Scores) -> Section:
    """Q1, Q2: speed-ups to the baseline's levels (epochs, images, wall-clock), and to the
    step-matched control's (steps), on the validation loss and on the sample metric (FD)."""
    lines = ["## Q1, Q2: how much sooner does each cell reach the reference's loss and FD?", ""]
    lines += [
        "Levels: the reference cell's mean value at 25%, 50%, 75% and 100% of its validation "
        "points (EMA validation loss) or of its evaluation points (Frechet distance of samples "
        f"to the {scores.split} frames), mean over its seeds. Each entry: (reference position) "
        "/ (cell position) at the cell's first point at or below the level, as the ratio of seed means, "
        "the range over seed pairs, and the cell's positions. > 1: the cell is faster. "
        "Resolution: one validation or evaluation interval.",
        "",
    ]
    values: dict[str, Any] = {}
    for m, key in ((VAL_LOSS, "speedup"), (fd_measure(scores), "speedup_fd")):
        found = _speedups(questions, by_cell, m)
        lines += found.markdown
        values[key] = found.values["speedup"]
        values["levels" if m is VAL_LOSS else "levels_fd"] = found.values["levels"]
    return Section(lines, values)


def _speedups(questions: dict, by_cell, m: Measure) -> Section:
    """The speed-up tables of one measure, against the baseline and the step-matched control."""
    lines: list[str] = []
    speedups: dict[str, Any] = {}
    level_values: dict[str, Any] = {}
    refs = (("baseline", AXES), ("step_matched", ("steps", "images", "wall")))
    for role, axes in refs:
        ref_name = questions.get(role)
        if not ref_name:
            continue
        ref = by_cell.get(ref_name, [])
        if not ref or not any(m.points(run) for run in ref):
            lines += [f"*Cannot tell against the {role} on the {m.label}: `{ref_name}` has no "
                      "points.*", ""]  # fmt: skip
            continue
        targets = levels(ref, m)
        level_values[ref_name] = [{"label": label, "value": value} for label, _, value in targets]
        others = [name for name in by_cell if name != ref_name and by_cell[name]]
        for axis in axes:
            header = ["cell", *[f"{name}: {value:.4g}" for name, _, value in targets]]
            rows = []
            for name in others:
                row = []
                for _, index, value in targets:
                    found = speedup(ref, index, other=by_cell[name], level=value, axis=axis, m=m)
                    per = speedups.setdefault(ref_name, {}).setdefault(name, {})
                    per.setdefault(axis, []).append(found)
                    row.append(fmt_speedup(found, axis))
                rows.append([name, *row])
            head = (
                f"### {m.label}: against `{ref_name}` ({role.replace('_', '-')}), at equal "
                f"{AXIS_WORDS[axis]}"
            )
            lines += [head, "", *table(header, rows), ""]
    return Section(lines, {"speedup": speedups, "levels": level_values})


def ablation_section(questions: dict, by_cell, scores: Scores) -> Section:
    names = [questions.get(k) for k in ("baseline", "step_matched", "seq", "adjacent", "method")]
    lambdas = [n for n in questions.get("lambdas", []) if n != questions.get("method")]
    names = [n for n in names if n] + lambdas
    lines = ["## Q3: flow against adjacent (w = 1) and seq (ordered, no regulariser)", ""]
    header = ["cell", "final val loss (EMA)", "min val loss (EMA)", "final val loss (raw weights)",
              f"{scores.fd} (last)"]  # fmt: skip
    rows, res = [], {}
    for name in names:
        runs = by_cell.get(name, [])
        n = max(1, len(runs))
        mins = [min(p[KEY] for p in vp) if (vp := val_points(r)) else None for r in runs]
        finals = [final_val(r) for r in runs]
        fds = [scores.final(r, "fid") for r in runs]
        raw = [vp[-1].get("val_loss") if (vp := val_points(r)) else None for r in runs]
        res[name] = {"final_val": finals, "min_val": mins, "final_val_raw": raw, "fd_val": fds}
        rows.append([name, mean_std(finals, n, 4), mean_std(mins, n, 4), mean_std(raw, n, 4),
                     mean_std(fds, n)])  # fmt: skip
    lines += ["At the end of the equal image budget.", "", *table(header, rows), ""]
    lines += [f"{scores.fd} at each evaluation point:", ""]
    lines += [*fd_curve_table(names, by_cell, scores), ""]
    return Section(lines, {"ablation": res})


def gradient_section(questions: dict, by_cell) -> Section:
    names = [questions.get(k) for k in ("baseline", "step_matched", "seq", "adjacent")]
    names += list(questions.get("lambdas", [])) or [questions.get("method")]
    names = list(dict.fromkeys(n for n in names if n))
    lines = ["## Q4: gradient variance, gradient norm and parameter distance", ""]
    lines += [
        "grad_var: mean over the diag points of the per-sample gradient variance on the fixed "
        "probe batch (a sample is a window for window methods, a frame for iid). grad norm: "
        "mean over the last quarter of steps (before clipping). param distance: L2 from init "
        "at the last step; per step: divided by the steps taken.",
        "",
    ]
    header = ["cell", "steps", "grad_var (mean)", "grad norm (last 25%)", "param distance",
              "param distance / step"]  # fmt: skip
    rows, res = [], {}
    for name in names:
        runs = by_cell.get(name, [])
        n = max(1, len(runs))
        gv = [grad_var_mean(r) for r in runs]
        gn = [tail_mean(step_records(r), "grad_norm") for r in runs]
        last = [step_records(r)[-1] if step_records(r) else {} for r in runs]
        pd = [v if _finite(v := rec.get("param_dist")) else None for rec in last]
        per = [p / rec["step"] if _finite(p) and rec.get("step") else None for p, rec in zip(pd, last, strict=True)]  # fmt: skip
        steps = sorted({rec.get("step") for rec in last if rec})
        res[name] = {"grad_var": gv, "grad_norm": gn, "param_dist": pd}
        rows.append([name, ",".join(map(str, steps)) or "—", mean_std(gv, n), mean_std(gn, n),
                     mean_std(pd, n), mean_std(per, n)])  # fmt: skip
    return Section([*lines, *table(header, rows), ""], {"gradients": res})


def lambda_section(questions: dict, by_cell, scores: Scores) -> Section:
    names = [n for n in questions.get("lambdas", []) if n]
    lines = ["## Q5: sensitivity to lambda, and the size of the regulariser", ""]
    if not names:
        return Section([*lines, "*No lambda cells named.*", ""])
    lines += [
        "reg / denoise: the unweighted regulariser over the denoising loss, mean over the first "
        "and the last quarter of steps; lam x reg / loss: its share of the optimised loss.",
        "",
    ]
    header = ["cell", "lambda", "final val loss (EMA)", scores.fd, "reg/denoise (first 25%)",
              "reg/denoise (last 25%)", "lam x reg / loss (last 25%)"]  # fmt: skip
    rows, res = [], {}
    for name in names:
        runs = by_cell.get(name, [])
        n = max(1, len(runs))
        lam = runs[0].config.get("lam") if runs else None
        recs = [reg_ratio_records(r) for r in runs]
        first = [_mean([x["reg_ratio"] for x in rr[: max(1, len(rr) // 4)]]) if rr else None for rr in recs]  # fmt: skip
        lastq = [tail_mean(rr, "reg_ratio") for rr in recs]
        share = [tail_mean(rr, "reg_share") for rr in recs]
        finals = [final_val(r) for r in runs]
        fds = [scores.final(r, "fid") for r in runs]
        res[name] = {"lam": lam, "final_val": finals, "fd_val": fds, "reg_ratio_first": first,
                     "reg_ratio_last": lastq, "reg_share_last": share}  # fmt: skip
        rows.append([name, str(lam), mean_std(finals, n, 4), mean_std(fds, n),
                     mean_std(first, n), mean_std(lastq, n), mean_std(share, n)])  # fmt: skip
    return Section([*lines, *table(header, rows), ""], {"lambda": res})


SAMPLE_KEYS = ("fid", "precision", "recall", "density", "coverage")


def _reading(config: dict) -> str:
    """How a run weights its pairs, in words: ``inverse on flow_mag (scale 1), lam 0.1``."""
    if config.get("method") != "flow":
        return config.get("method") or "?"
    weighting, stat = config.get("weighting", "exp"), config.get("flow_stat", "msq")
    scale = config.get("sigma") if weighting == "exp" else config.get("flow_scale")
    name = "sigma" if weighting == "exp" else "scale"
    scale = f"{scale:.4g}" if _finite(scale) else "?"
    return f"{weighting} on flow_{stat} ({name} {scale}), lam {config.get('lam')}"


def _sample_table(names, by_cell, scores: Scores, res: dict) -> list[str]:
    """Per cell: its reading, final val loss and the last evaluation's sample metrics (the
    numbers also go into `res`)."""
    rows = []
    for name in names:
        runs = by_cell.get(name, [])
        n = max(1, len(runs))
        finals = {k: [scores.final(r, k) for r in runs] for k in SAMPLE_KEYS}
        val = [final_val(r) for r in runs]
        reading = _reading(runs[0].config) if runs else "—"
        res[name] = {"reading": reading, "final_val": val, **finals}
        rows.append([name, reading, f"{len(runs)}", mean_std(val, n, 4),
                     *[mean_std(finals[k], n) for k in SAMPLE_KEYS]])  # fmt: skip
    header = ["cell", "reading", "seeds", "val loss (EMA)", "FD", "precision", "recall",
              "density", "coverage"]  # fmt: skip
    return table(header, rows)


def readings_section(questions: dict, by_cell, scores: Scores) -> Section:
    """Q6: the readings of the method (the paper's text, its public code) against each other
    and against the baseline, at the end of the equal image budget."""
    readings = [n for n in questions.get("readings", []) if n]
    lines = ["## Q6: the two readings of the method", ""]
    if not readings:
        return Section([*lines, "*No readings named.*", ""])
    names = list(dict.fromkeys([*(questions.get(k) for k in ("baseline", "step_matched")
                                  if questions.get(k)), *readings]))  # fmt: skip
    lines += [
        "At the end of the equal image budget, mean ± std over seeds; sample metrics of the "
        f"last evaluation point against the {scores.split} frames ({scores.extractor} "
        "extractor). Speed-ups on the validation loss and on the FD are in the Q1, Q2 tables.",
        "",
    ]
    res: dict[str, Any] = {}
    lines += [*_sample_table(names, by_cell, scores, res), ""]
    lines += [f"{scores.fd} at each evaluation point:", ""]
    lines += [*fd_curve_table(names, by_cell, scores), ""]
    return Section(lines, {"readings": res})


def diversity_section(study, by_cell, scores: Scores, out: Path) -> Section:
    """Q7: recall and coverage of every cell, and a grid of each cell's last samples."""
    names = [c["name"] for c in study.grid]
    lines = ["## Q7: diversity", ""]
    lines += [
        f"Recall (the share of real {scores.split} frames whose neighbourhood holds a sample) "
        "and coverage (the share of real frames with a sample inside their own nearest-"
        "neighbour ball) of the last evaluation point, mean ± std over seeds, with precision "
        "and density beside them; then each cell's last samples (first seed).",
        "",
    ]
    res: dict[str, Any] = {}
    lines += [*_sample_table(names, by_cell, scores, res), ""]
    grids = {}
    for name in names:
        shown = variants(by_cell, [name])
        file = f"study-samples-{plots.slug(name)}.png"
        caption = plots.sample_grid(shown[0], out / file) if shown else None
        grids[name] = file if caption else None
        lines += [f"![{name}]({file})", "", f"*{name}: {caption}.*", ""] if caption else [
            f"*{name}: no samples.*", ""]  # fmt: skip
    return Section(lines, {"diversity": res, "sample_grids": grids})


# --- plots -------------------------------------------------------------------------------------


def _plot_speed(questions, by_cell, path: Path) -> bool:
    names = [questions.get("baseline"), questions.get("step_matched"), questions.get("method")]
    shown = variants(by_cell, names)
    if not shown:
        return False
    fig, axes = plots.figure(3)
    base = by_cell.get(questions.get("baseline"), [])
    ok = False
    for ax, axis in zip(axes, AXES, strict=True):
        ok |= plots.draw(
            ax,
            shown,
            points=val_points,
            axis=axis,
            key=KEY,
            title=f"val loss (EMA), log, vs {AXIS_WORDS[axis]}",
            log=True,
        )
        for _, _, value in levels(base) if base else []:
            ax.axhline(value, color="gray", lw=0.7, ls="--")
    plots.save_png(fig, path)
    return ok


def _draw_val_loss(ax, shown) -> bool:
    """The EMA validation loss of the variants against images, on a log axis."""
    return plots.draw(
        ax, shown, points=val_points, axis="images", key=KEY, title="val loss (EMA), log", log=True
    )


def _plot_ablation(questions, by_cell, scores: Scores, path: Path) -> bool:
    names = [questions.get(k) for k in ("baseline", "seq", "adjacent", "method")]
    shown = variants(by_cell, [n for n in names if n])
    if not shown:
        return False
    fig, (loss_ax, fd_ax) = plots.figure(2)
    ok = _draw_val_loss(loss_ax, shown)
    plots.draw(
        fd_ax,
        shown,
        points=scores.points,
        axis="images",
        key="fid",
        title=scores.fd,
    )
    plots.save_png(fig, path)
    return ok


def _plot_gradients(questions, by_cell, path: Path) -> bool:
    names = [
        questions.get("baseline"),
        questions.get("step_matched"),
        *questions.get("lambdas", []),
    ]
    shown = variants(by_cell, list(dict.fromkeys(n for n in names if n)))
    if not shown:
        return False
    fig, (var_ax, dist_ax, norm_ax) = plots.figure(3)
    ok = plots.draw(
        var_ax,
        shown,
        points=lambda run: run.kind("diag"),
        axis="images",
        key="grad_var",
        title="per-sample gradient variance (probe)",
        log=True,
    )
    ok |= plots.draw(
        dist_ax,
        shown,
        points=step_records,
        axis="steps",
        key="param_dist",
        title="parameter distance from init",
    )
    ok |= plots.draw(
        norm_ax,
        shown,
        points=step_records,
        axis="steps",
        key="grad_norm",
        title="gradient norm (before clip)",
    )
    plots.save_png(fig, path)
    return ok


def _plot_lambda(questions, by_cell, path: Path) -> bool:
    shown = variants(by_cell, list(questions.get("lambdas", [])))
    if not shown:
        return False
    fig, (share_ax, loss_ax) = plots.figure(2)
    ok = plots.draw(
        share_ax,
        shown,
        points=reg_ratio_records,
        axis="steps",
        key="reg_share",
        title="lam x reg / loss (share of the objective)",
        log=True,
    )
    ok |= _draw_val_loss(loss_ax, shown)
    plots.save_png(fig, path)
    return ok


# --- entry -------------------------------------------------------------------------------------

STEP_KEYS = ("step", "epoch", "images", "wall_s", "loss", "denoise", "reg", "disp", "grad_norm",
             "param_dist")  # fmt: skip
MAX_STEP_RECORDS = 200  # per run in curves.json: every n-th step and the last


def curves(by_cell: dict[str, list[Run]]) -> dict[str, Any]:
    """The measured curves of every run, small enough to commit with a study's results."""
    out: dict[str, Any] = {}
    for name, runs in by_cell.items():
        for run in runs:
            steps = step_records(run)
            stride = max(1, -(-len(steps) // MAX_STEP_RECORDS))
            kept = steps[::stride] + ([steps[-1]] if steps and (len(steps) - 1) % stride else [])
            evals = [{k: v for k, v in e.items() if k not in ("run", "samples", "shards")} for e in run.evals]  # fmt: skip
            out[f"{name}-s{run.seed}"] = {
                "cell": name,
                "seed": run.seed,
                "config": run.config,
                "val": run.kind("val"),
                "diag": run.kind("diag"),
                "evals": sorted(evals, key=lambda e: (e["step"], e["split"], e["extractor"])),
                "steps": [{k: r[k] for k in STEP_KEYS if k in r} for r in kept],
            }
    return out


def write(study, cells, out: Path) -> Path:
    """Write results.md, results.json and the study plots into `out`; return results.md."""
    out = Path(out)
    extractor = study.evaluation["extractor"]
    scores = Scores(extractor, study.questions.get("split", "val"))
    by_cell = load_cells(cells)
    questions = study.questions
    results: dict[str, Any] = {"study": study.name, "budget_images": study.images}
    lines = [f"# Study `{study.name}`: results", ""]
    lines += [
        f"Budget per cell: {study.images} images processed; seeds {study.seeds}. Frechet "
        f"distances use the {extractor} extractor"
        + (" (a fixed small network: not FID)" if extractor == "offline" else "")
        + f", against the {scores.split} split's frames."
        + " Full tables and plots: [report/report.md](report/report.md).",
        "",
        "## Cells",
        "",
        *cell_table(study, by_cell, scores),
        "",
    ]
    runs = {r.path: r for rs in by_cell.values() for r in rs}
    missing = [c.label for c in cells if c.run not in runs or not scores.points(runs[c.run])]
    if missing:
        lines += ["Cells without evaluation points (missing): " + ", ".join(missing), ""]
    results["missing_evaluations"] = missing
    if questions:
        sections = (
            speed_section(questions, by_cell, scores),
            ablation_section(questions, by_cell, scores),
            gradient_section(questions, by_cell),
            lambda_section(questions, by_cell, scores),
            readings_section(questions, by_cell, scores),
            diversity_section(study, by_cell, scores, out),
        )
        for section in sections:
            lines += section.markdown
            results.update(section.values)
        figures = (
            ("study-speed.png", _plot_speed(questions, by_cell, out / "study-speed.png"),
             "Q1-Q2: EMA validation loss of baseline, step-matched control and method against "
             "epochs, images and wall-clock; dashed: the levels."),
            ("study-ablation.png", _plot_ablation(questions, by_cell, scores, out / "study-ablation.png"),
             "Q3: validation loss and Frechet distance of iid, seq, adjacent and flow."),
            ("study-gradients.png", _plot_gradients(questions, by_cell, out / "study-gradients.png"),
             "Q4: gradient variance, parameter distance and gradient norm."),
            ("study-lambda.png", _plot_lambda(questions, by_cell, out / "study-lambda.png"),
             "Q5: the regulariser's share of the loss and the validation loss per lambda."),
        )  # fmt: skip
        lines += ["## Figures", ""]
        for file, ok, caption in figures:
            lines += [f"![{caption}]({file})", "", f"*{caption}*", ""] if ok else [
                f"*{caption} Not plotted: no cells or points for it ({file}).*", ""]  # fmt: skip
        drawn = {file for file, ok, _ in figures if ok}
        drawn |= {file for file in results.get("sample_grids", {}).values() if file}
        plots.drop_stale(out, "study-*.png", drawn, marker="results.md")
    for name, data in (("results.json", results), ("curves.json", curves(by_cell))):
        text = json.dumps(data, indent=None, separators=(",", ":"), default=str)
        atomic_write_text(out / name, text)
    path = out / "results.md"
    atomic_write_text(path, "\n".join(lines))
    return path
