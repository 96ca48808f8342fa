"""Look at a build: counts per split, flow_msq (and flow_mag) histograms and a grid of random
windows."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
from matplotlib.figure import Figure

from shards_spec.atomic import atomic_write_bytes
from shards_spec.format import has_flow_mag
from shards_spec.reader import decode_sample, open_build, pair_values
from shards_spec.writer import encode_png

TILE_MIN = 128  # frames smaller than this are enlarged (nearest) so the labels stay readable
BAND = 20  # height of the text bands above and below each row
HIST_BINS = 40


def _finite(values) -> np.ndarray:
    arr = np.asarray(values, float)
    return arr[np.isfinite(arr)]


def _hist_panel(ax, values_by_split: dict[str, np.ndarray], mark: float, label: str,
                xlabel: str) -> dict:  # fmt: skip
    """One histogram per split on ``ax`` with a dashed line at ``mark``; its bins and counts.
    Values that are not finite (null cells of a damaged index; ``validate`` names them) are left
    out."""
    values_by_split = {s: _finite(v) for s, v in values_by_split.items()}
    every = np.concatenate([*values_by_split.values(), np.zeros(0)])
    top = float(np.percentile(every, 99.5)) if every.size else 1.0
    edges = np.linspace(0.0, max(top, mark * 2, 1e-6), HIST_BINS + 1)
    counts = {}
    for split, values in values_by_split.items():
        clipped = np.clip(values, edges[0], edges[-1])
        counts[split] = np.histogram(clipped, bins=edges)[0].tolist()
        ax.hist(clipped, bins=edges, histtype="step", label=f"{split} ({len(values)} pairs)")
    ax.axvline(mark, color="k", linestyle="--", linewidth=1, label=f"{label} = {mark:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    return {"bins": edges.tolist(), "counts": counts}


def _hist_png(
    msq_by_split: dict[str, np.ndarray],
    sigma: float,
    mag_by_split: dict[str, np.ndarray] | None = None,
    mag_median: float | None = None,
) -> tuple[bytes, dict, dict | None]:
    """The flow_msq histogram, and beside it the flow_mag one when the build has flow_mag."""
    panels = 1 if mag_by_split is None else 2
    fig = Figure(figsize=(6 * panels, 3.5), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, panels))
    tail = "last bin holds the tail"
    hist = _hist_panel(axes[0], msq_by_split, sigma, "sigma",
                       f"flow_msq (pixels^2 at flow_size; {tail})")  # fmt: skip
    mag_hist = None
    if mag_by_split is not None:
        mark = 0.0 if mag_median is None else mag_median
        mag_hist = _hist_panel(axes[1], mag_by_split, mark, "p50",
                               f"flow_mag (pixels at flow_size; {tail})")  # fmt: skip
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue(), hist, mag_hist


def _label(img: np.ndarray, text: str, center_x: int | None, left: int, baseline: int) -> None:
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (width, _), _ = cv2.getTextSize(text, font, scale, 1)
    x = left if center_x is None else max(0, center_x - width // 2)
    cv2.putText(img, text, (x, baseline), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _grid(samples: list[dict], window: int, size: int, mag: bool = False) -> np.ndarray:
    """Rows of K frames; the key above each row, weight and flow_msq of each pair below it, and
    with ``mag`` a second line with each pair's flow_mag."""
    tile = max(size, TILE_MIN)
    row_h = BAND + tile + BAND * (2 if mag else 1)
    grid = np.full((max(1, len(samples)) * row_h, window * tile, 3), 32, np.uint8)
    for r, s in enumerate(samples):
        top = r * row_h
        _label(grid, s["key"], None, 4, top + BAND - 7)
        for k, frame in enumerate(s["frames"]):
            big = cv2.resize(frame, (tile, tile), interpolation=cv2.INTER_NEAREST)
            grid[top + BAND : top + BAND + tile, k * tile : (k + 1) * tile] = big
        meta = s["meta"]
        for k, (w, d) in enumerate(zip(meta["weight"], meta["flow_msq"], strict=True)):
            text = f"w {w:.2f}  d {d:.3g}"
            _label(grid, text, (k + 1) * tile, 0, top + BAND + tile + BAND - 7)
        if mag:
            for k, m in enumerate(meta.get("flow_mag") or ()):
                _label(grid, f"mag {_num(m)}", (k + 1) * tile, 0, top + row_h - 7)
    return grid


def inspect_build(
    path: str | os.PathLike, out_png: str | None = None, n: int = 16, seed: int = 0
) -> dict:
    """Counts, a flow_msq histogram PNG and a PNG grid of `n` seeded random windows.

    The grid goes to `out_png` (default ``<build>/inspect.png``), the histogram beside it as
    ``<stem>_flow_hist.png``; for a build with flow_mag (spec 1.1 on) the histogram PNG has a
    second panel, of flow_mag, and the grid shows each pair's flow_mag. Returns a report dict
    (see format_inspect).
    """
    build = open_build(path)
    mag = has_flow_mag(build.manifest)
    columns = ["split", "clip_id", "frame_ids", "flow_msq", "weight"]
    table = build.index(columns + (["flow_mag"] if mag else []))
    grid_path = Path(out_png) if out_png else build.path / "inspect.png"
    hist_path = grid_path.with_name(f"{grid_path.stem}_flow_hist.png")

    splits = build.splits
    split_col = table.column("split")
    in_split = {s: pc.equal(split_col, s).fill_null(False) for s in splits}
    values = {s: pair_values(table.filter(m)) for s, m in in_split.items()}
    mags = (
        {s: pair_values(table.filter(m), "flow_mag") for s, m in in_split.items()} if mag else None
    )
    weights = {
        s: pc.list_flatten(table.filter(m).column("weight")).to_numpy(zero_copy_only=False)
        for s, m in in_split.items()
    }
    index_rows = {s: int(pc.sum(m).as_py() or 0) for s, m in in_split.items()}
    n_rows = table.num_rows
    del table, split_col, in_split
    sigma = float(build.manifest["flow"]["sigma"])
    mag_stats = build.manifest["flow"].get("mag_stats") if mag else None
    median = mag_stats["percentiles"]["p50"] if mag_stats else None
    if not isinstance(median, (int, float)) or not np.isfinite(median):
        median = None
    hist_bytes, hist, mag_hist = _hist_png(values, sigma, mags, median)
    atomic_write_bytes(hist_path, hist_bytes)

    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(n_rows, size=min(n, n_rows), replace=False).tolist())
    where = build.index(["shard", "position"]).take(picked).to_pylist()
    raw = build.raw_at((r["shard"], r["position"]) for r in where)
    samples = [decode_sample(r, build.window) for r in raw]
    grid = _grid(samples, build.window, build.image_size, mag=mag)
    atomic_write_bytes(grid_path, encode_png(grid))

    return {
        "path": str(build.path),
        "spec_version": build.manifest["spec_version"],
        "window": build.window,
        "image_size": build.image_size,
        "members": build.members,
        "counts": {s: build.count(s) for s in splits},
        "index_rows": index_rows,
        "shards": {s: len(build.urls(s)) for s in splits},
        "pairs": {s: len(v) for s, v in values.items()},
        "mean_weight": {s: float(np.mean(w)) if len(w) else None for s, w in weights.items()},
        "sigma": sigma,
        "flow_backend": build.manifest["flow"]["backend"],
        "flow_stats": build.manifest["flow"]["stats"],
        "mag_stats": mag_stats,
        "hist": hist,
        "mag_hist": mag_hist,
        "shown": [s["key"] for s in samples],
        "grid_png": str(grid_path),
        "hist_png": str(hist_path),
    }


def _num(value: float | None) -> str:
    """A statistic for the summary; a damaged manifest may hold nulls (``validate`` says so)."""
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.3g}"


def format_inspect(report: dict) -> str:
    """A short human summary of an inspect report."""
    lines = [
        f"build {report['path']} (format {report['spec_version']}, K={report['window']}, "
        f"{report['image_size']}px, members {' '.join(report['members'])})"
    ]
    for split, count in report["counts"].items():
        mean_w = report["mean_weight"][split]
        shown_w = "n/a" if mean_w is None else f"{mean_w:.3f}"
        lines.append(
            f"  {split}: {count} windows in {report['shards'][split]} shards, "
            f"{report['pairs'][split]} distinct pairs, mean weight {shown_w}"
        )
    stats = report["flow_stats"]
    p = stats["percentiles"]
    if stats["count"]:
        lines.append(
            f"  flow {report['flow_backend']}: sigma {report['sigma']:.4g}; flow_msq p5 "
            f"{_num(p['p5'])}  p50 {_num(p['p50'])}  p95 {_num(p['p95'])}  "
            f"max {_num(stats['max'])}"
        )
    else:
        lines.append(f"  flow {report['flow_backend']}: sigma {report['sigma']:.4g}; no stats")
    mag = report.get("mag_stats")
    if mag and mag["count"]:
        q = mag["percentiles"]
        lines.append(
            f"  flow_mag p5 {_num(q['p5'])}  p50 {_num(q['p50'])}  p95 {_num(q['p95'])}  "
            f"max {_num(mag['max'])} (pixels)"
        )
    lines.append(f"  grid: {report['grid_png']} ({len(report['shown'])} windows)")
    lines.append(f"  flow histogram: {report['hist_png']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="build folder")
    parser.add_argument("--out", help="grid PNG path (default: <build>/inspect.png)")
    parser.add_argument("--n", type=int, default=16, help="windows in the grid (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")


def run(args: argparse.Namespace) -> int:
    print(format_inspect(inspect_build(args.path, args.out, n=args.n, seed=args.seed)))
    return 0
