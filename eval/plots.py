"""The figures of `python -m eval report` (one PNG each, drawn on an Agg canvas) and the
formatting of values shared with its tables; `figure`, `draw` and `save_png` are the panel
helpers that `eval/study_results.py` draws the study's figures with too.

Curves are the mean over seeds of the points measured at the same step, with a shaded min-max
band where several seeds have that step; nothing is interpolated or smoothed. The figure
functions (the ``*_plot`` ones, and `draw` for one panel) take the report's variants (objects
with ``label``, ``color`` and ``runs``; a run has ``path``, ``seed``, ``x(record, axis)``,
``kind(kind)`` and ``fid_points(extractor, split)``) and return False when they have nothing to
draw, in which case no file is written; `sample_grid` (of one variant) returns None then.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from shards_spec.atomic import atomic_output

AXIS_TITLES = {
    "steps": "optimizer steps",
    "epochs": "epochs",
    "images": "images processed",
    "wall": "training wall-clock",
}
MAX_POINTS = 3000  # per curve; longer per-step curves keep every n-th step (and the last)
Points = Callable[[Any], list[dict]]


def duration(seconds: float) -> str:
    """Seconds as ``45 s``, ``12.5 min`` or ``3.2 h``."""
    if abs(seconds) >= 7200:
        return f"{seconds / 3600:.3g} h"
    if abs(seconds) >= 120:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


def decimals(x: float, sig: int = 3) -> int:
    """Decimals of a value: 2 from 1 up, else enough for `sig` significant digits."""
    return 2 if abs(x) >= 1 or x == 0 else max(2, sig - 1 - math.floor(math.log10(abs(x))))


def fmt_axis(x: float | None, axis: str) -> str:
    """A position on an axis, with its unit."""
    if x is None:
        return "—"
    if axis == "epochs":
        return f"{x:.2f}".rstrip("0").rstrip(".") + " ep"
    if axis == "images":
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= div:
                return f"{x / div:.3g}{suffix} img"
        return f"{x:g} img"
    if axis == "wall":
        return duration(x)
    return f"step {x}"


def mean_std(values: list[float | None], total: int, sig: int = 3) -> str:
    """``mean ± std`` over the values present; ``(n=k)`` when some runs have none; — if none."""
    have = [v for v in values if v is not None]
    if not have:
        return "—"
    mean = statistics.fmean(have)
    d = decimals(mean, sig)
    text = f"{mean:.{d}f}" + (f" ± {statistics.stdev(have):.{d}f}" if len(have) > 1 else "")
    return text + (f" (n={len(have)})" if len(have) < total else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]


def _wall_scale(largest: float) -> tuple[float, str]:
    if largest >= 7200:
        return 3600.0, "h"
    return (60.0, "min") if largest >= 120 else (1.0, "s")


def aggregate(per_run: list[list[tuple[int, float, float]]]) -> dict[str, np.ndarray]:
    """(step, x, y) points of several seeds -> per step: mean x, mean y, min y, max y, count."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for points in per_run:
        for step, x, y in points:
            by_step.setdefault(step, []).append((x, y))
    steps = sorted(by_step)
    if len(steps) > MAX_POINTS:
        stride = math.ceil(len(steps) / MAX_POINTS)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    cols = {"x": [], "y": [], "lo": [], "hi": [], "n": []}
    for step in steps:
        xy = np.asarray(by_step[step], dtype=float)
        cols["x"].append(xy[:, 0].mean())
        cols["y"].append(xy[:, 1].mean())
        cols["lo"].append(xy[:, 1].min())
        cols["hi"].append(xy[:, 1].max())
        cols["n"].append(len(xy))
    return {k: np.asarray(v, dtype=float) for k, v in cols.items()}


def _series(variant, points: Points, axis: str, key: str) -> list[list[tuple[int, float, float]]]:
    """Per run of the variant: its (step, position on axis, value of key) points."""
    out = []
    for run in variant.runs:
        pts = []
        for rec in points(run):
            x, y = run.x(rec, axis), rec.get(key)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y == y:
                pts.append((int(rec["step"]), float(x), float(y)))
        if pts:
            out.append(pts)
    return out


def draw(ax, variants, points: Points, axis: str, key: str, title: str, log=False) -> bool:
    """One panel: a curve (and band) per variant; False when no variant has a point."""
    found = [(v, s) for v in variants if (s := _series(v, points, axis, key))]
    curves = [(v, aggregate(s), len(s)) for v, s in found]
    if not curves:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        return False
    scale, unit = 1.0, ""
    if axis == "wall":
        scale, unit = _wall_scale(max(c["x"].max() for _, c, _ in curves))
    for v, c, seeds in curves:
        x = c["x"] / scale
        marker = "o" if len(x) <= 60 else None
        label = v.label + (f" ({seeds} seeds)" if seeds > 1 else "")
        ax.plot(x, c["y"], color=v.color, marker=marker, ms=3, lw=1.3, label=label)
        if c["n"].max() > 1:
            ax.fill_between(x, c["lo"], c["hi"], color=v.color, alpha=0.2, lw=0)
    if log and all((c["lo"] > 0).all() for _, c, _ in curves):
        ax.set_yscale("log")
    ax.set_xlabel(AXIS_TITLES[axis] + (f" ({unit})" if unit else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True


def figure(panels: int) -> tuple[Figure, list]:
    """A figure of ``panels`` side-by-side axes on an Agg canvas, and the axes."""
    fig = Figure(figsize=(5.2 * panels, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def save_png(fig: Figure, path: Path) -> None:
    """Write the figure to ``path`` as a PNG, atomically."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def fid_plot(variants, extractor: str, name: str, axis: str, path: Path) -> bool:
    """FID (val and train panels) of one extractor against an axis."""
    fig, axes = figure(2)
    drawn = [
        draw(
            ax,
            variants,
            points=lambda run, split=split: run.fid_points(extractor, split),
            axis=axis,
            key="fid",
            title=title,
        )
        for ax, split, title in zip(
            axes, ("val", "train"), (f"{name}, val split", f"{name}, train split"), strict=True
        )
    ]
    for ax in axes:
        ax.set_ylabel(name)
    if any(drawn):
        save_png(fig, path)
    return any(drawn)


def val_loss_plot(variants, axis: str, path: Path) -> bool:
    """Validation loss of the EMA weights against an axis."""
    fig, (ax,) = figure(1)
    ok = draw(
        ax,
        variants,
        points=lambda run: run.kind("val"),
        axis=axis,
        key="val_loss_ema",
        title="validation loss (EMA)",
    )
    ax.set_ylabel("denoising loss, fixed val set")
    if ok:
        save_png(fig, path)
    return ok


def optimisation_plot(variants, path: Path) -> bool:
    """The paper's Fig. 3: gradient norm and parameter distance from init against steps."""
    fig, axes = figure(2)
    drawn = [
        draw(ax, variants, points=lambda run: run.kind(None), axis="steps", key=key, title=title)
        for ax, key, title in zip(
            axes,
            ("grad_norm", "param_dist"),
            ("gradient norm (before clipping)", "parameter distance from init (L2)"),
            strict=True,
        )
    ]
    if any(drawn):
        save_png(fig, path)
    return any(drawn)


def grad_var_plot(variants, path: Path) -> bool:
    """Gradient-variance estimate on the fixed probe batch (diag records) against epochs."""
    fig, (ax,) = figure(1)
    ok = draw(
        ax,
        variants,
        points=lambda run: run.kind("diag"),
        axis="epochs",
        key="grad_var",
        title="gradient variance",
        log=True,
    )
    ax.set_ylabel("mean squared deviation of per-sample gradients")
    if ok:
        save_png(fig, path)
    return ok


def latest_samples(run) -> tuple[int, list[Path]] | None:
    """The step and PNGs of the run's latest ``samples/<step>/`` folder that has images."""
    root = Path(run.path) / "samples"
    found = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit()] if root.is_dir() else []
    for folder in sorted(found, key=lambda d: int(d.name), reverse=True):
        files = sorted(f for f in folder.glob("*.png") if not f.name.startswith("."))
        if files:
            return int(folder.name), files
    return None


def mosaic(images: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """Images (n, h, w, 3) uint8 tiled ``cols`` wide, ``pad`` white pixels around each."""
    n, h, w = images.shape[:3]
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def sample_grid(variant, path: Path) -> str | None:
    """A grid of the first 36 (or 16) samples of the variant's first seed; its caption."""
    run = variant.runs[0]
    found = latest_samples(run)
    if found is None:
        return None
    step, files = found
    n = 36 if len(files) >= 36 else 16 if len(files) >= 16 else len(files)
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files[:n]]
    h, w = tiles[0].shape[:2]
    tiles = [
        t if t.shape[:2] == (h, w) else np.asarray(Image.fromarray(t).resize((w, h))) for t in tiles
    ]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = mosaic(np.stack(tiles), cols, pad=2)
    side = min(8.0, max(3.0, cols * 1.1))
    fig = Figure(figsize=(side, side * rows / cols + 0.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{variant.label}: step {step}, seed {run.seed}", fontsize=10)
    save_png(fig, path)
    return f"first {n} of {len(files)} samples at step {step} of `{run.path}` (seed {run.seed})"


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    text = text.replace("λ", "lam").replace("σ", "sigma").replace("δ", "delta")
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "variant"


def _entry(title: str, file: str | bool | None, caption: str, missing: str) -> list[str]:
    if not file:
        return [f"### {title}", "", f"*Not plotted: {missing}.*", ""]
    return [f"### {title}", "", f"![{caption}]({file})", "", f"*{caption}*", ""]


def drop_stale(out: Path, pattern: str, drawn: set[str], marker: str) -> None:
    """Delete the files matching `pattern` in `out` that this writing did not draw: a figure of
    an earlier report (a cell since removed, a grid numbered differently, a plot with no data
    now) must not sit beside the report that no longer shows it.

    Only where `out` holds `marker`, the earlier report itself: a folder this project did not
    write a report into keeps every file; a folder named like a figure is not a figure and
    stays. A file that cannot be removed is said on stderr and stays: the report still lands."""
    if not (out / marker).is_file():
        return
    for path in out.glob(pattern):
        if path.name in drawn or (path.is_dir() and not path.is_symlink()):
            continue
        try:
            path.unlink()
        except OSError as exc:
            print(
                f"warning: could not remove the stale figure {path}: {exc.strerror}",
                file=sys.stderr,
            )


REPORT_FIGURES = (
    "fid-*.png",
    "val-loss-*.png",
    "optimisation.png",
    "grad-var.png",
    "samples-*.png",
)


def section(variants, out: Path, names: dict[str, tuple[str, str]]) -> list[str]:
    """Draw every figure into `out`; the markdown of the report's plot section.

    `names` maps each extractor to report to its (title, short name). Figures of an earlier
    report in `out` that this one does not draw are removed.
    """
    drawn: set[str] = set()

    def entry(title: str, file: str, ok: object, caption: str, missing: str) -> list[str]:
        if ok:
            drawn.add(file)
        return _entry(title, ok and file, caption, missing)

    lines = ["## Plots", "", "Mean over seeds of the points at the same step (x: the mean of"]
    lines += ["their positions); shaded: min-max over seeds.", ""]
    for ext, (title, short) in names.items():
        for axis in ("epochs", "images", "wall"):
            file = f"fid-{ext}-{axis}.png"
            ok = fid_plot(variants, ext, name=short, axis=axis, path=out / file)
            caption = f"{title}: val (left) and train (right) against {AXIS_TITLES[axis]}."
            missing = f"no {title} points in any run"
            lines += entry(f"{title} against {AXIS_TITLES[axis]}", file, ok, caption, missing)
    for axis in ("epochs", "images", "wall"):
        file = f"val-loss-{axis}.png"
        ok = val_loss_plot(variants, axis, out / file)
        caption = f"Validation loss of the EMA weights against {AXIS_TITLES[axis]}."
        missing = "no validation points in any run"
        lines += entry(f"Validation loss against {AXIS_TITLES[axis]}", file, ok, caption, missing)
    ok = optimisation_plot(variants, out / "optimisation.png")
    caption = "Gradient norm (before clipping) and parameter distance from init against steps."
    missing = "no per-step records in any run"
    lines += entry("Optimisation (the paper's Fig. 3)", "optimisation.png", ok, caption, missing)
    ok = grad_var_plot(variants, out / "grad-var.png")
    caption = "Per-sample gradient variance on the fixed probe batch against epochs (log y if > 0)."
    lines += entry("Gradient variance", "grad-var.png", ok, caption, "no diag records in any run")
    lines += ["## Samples", ""]
    for i, v in enumerate(variants):
        file = f"samples-{i:02d}-{slug(v.label)}.png"
        caption = sample_grid(v, out / file)
        missing = f"no samples/<step>/*.png in `{v.runs[0].path}`"
        lines += entry(v.label, file, caption, f"{v.label}: {caption}", missing)
    for pattern in REPORT_FIGURES:
        drop_stale(out, pattern, drawn, marker="report.md")
    return lines
