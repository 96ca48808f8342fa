"""Training throughput on CPU: each method against iid, and the loader against the trainer.

Measured side by side in one run on one synthetic build (HanCo format, `pipeline build`):

* per method, training images/s (frames through the UNet per second, loader included) with
  the same preset and the same images per step (iid at K x the window batch), as the median
  over steps after a warm-up; methods run in alternating rounds, because this VM's speed drifts;
* the loader alone (`train.data.batches`, 1 worker, the flow method's frames): windows/s,
  against the windows/s the tiny flow trainer consumes;
* the raw PNG-decode bound: the shards read with webdataset's tar reader and their frame
  members decoded with `cv2.imdecode` in one process (no shuffle, batching, JSON or worker),
  against the loader's frames/s.

Run: .venv/bin/python bench/train_throughput.py [--preset tiny --size 32 --steps 40 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from shards_spec import open_build
from shards_spec.reader import raw_samples
from train import data
from train.__main__ import main as train_main
from train.metrics import read_metrics, steps

METHODS = ("iid", "seq", "adjacent", "flow", "divergence", "dispersive")


def make_build(out: Path, size: int) -> Path:
    cmd = [sys.executable, "-m", "pipeline", "build", "--src", "synthetic", "--out", str(out),
           "--size", str(size), "--synth-sequences", "12", "--synth-frames", "48",
           "--shard-size", "128"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def train_rate(build: Path, method: str, batch: int, args, work: Path) -> float:
    """Median images/s of a run's steps after the first quarter."""
    out = work / f"{method}-{time.monotonic_ns()}"
    code = train_main(["--shards", str(build), "--out", str(out), "--method", method,
                       "--preset", args.preset, "--batch", str(batch), "--max-steps",
                       str(args.steps), "--val-every", "0", "--diag-every", "0",
                       "--ckpt-every", str(10**9), "--no-progress", "--workers", "1"])  # fmt: skip
    if code:
        raise SystemExit(f"training {method} failed")
    rates = [r["images_per_s"] for r in steps(read_metrics(out))]
    return statistics.median(rates[len(rates) // 4 :])


def loader_rate(build_path: Path, frames: tuple[int, ...], batch: int, n: int, workers=1) -> float:
    """Windows/s delivered by the loader over `n` batches after the first two."""
    build = open_build(build_path)
    stream = data.stream_for(
        build,
        "train",
        frames=frames,
        image_size=build.image_size,
        batch=batch,
        seed=0,
        workers=workers,
    )
    it = data.batches(stream, 0)
    next(it)
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t)


def decode_bound(build_path: Path, frames: tuple[int, ...]) -> float:
    """Frames/s of reading the shards (webdataset's tar reader) and cv2.imdecode of the frame
    members, in one process: no shuffle, no batching, no JSON, no worker."""
    cv2.setNumThreads(1)
    urls = open_build(build_path).urls("train")
    n = 0
    t = time.perf_counter()
    for raw in raw_samples(urls):
        for k in frames:
            cv2.imdecode(np.frombuffer(raw[f"f{k}.png"], np.uint8), cv2.IMREAD_COLOR)
            n += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=32, help="image side for the trainer runs")
    p.add_argument("--window-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = make_build(work / "small", args.size)
        full = make_build(work / "full", 128)
        K = open_build(small).window
        frames = tuple(range(K))
        rates: dict[str, list[float]] = {m: [] for m in METHODS}
        loader: dict[str, list[float]] = {"small": [], "full": [], "full2": []}
        bound: dict[str, list[float]] = {"small": [], "full": []}
        for _ in range(args.rounds):
            for method in METHODS:
                window = method not in ("iid", "dispersive")
                batch = args.window_batch if window else args.window_batch * K
                rates[method].append(train_rate(small, method, batch, args, work))
            for name, b in (("small", small), ("full", full)):
                loader[name].append(loader_rate(b, frames, args.window_batch, 60))
                bound[name].append(decode_bound(b, frames))
            loader["full2"].append(loader_rate(full, frames, args.window_batch, 60, workers=2))
    med = {m: statistics.median(v) for m, v in rates.items()}
    ld = {k: statistics.median(v) for k, v in loader.items()}
    bd = {k: statistics.median(v) for k, v in bound.items()}
    print(f"preset {args.preset}, {args.size} px, {args.window_batch} windows or "
          f"{args.window_batch * K} frames per step, medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'method':<12}{'images/s':>10}{'vs iid':>9}   runs")
    for m in METHODS:
        runs = " ".join(f"{r:.0f}" for r in rates[m])
        print(f"{m:<12}{med[m]:>10.1f}{med[m] / med['iid']:>8.2f}x   {runs}")
    consumed = med["flow"] / K
    print(f"loader, 1 worker, {args.size} px: {ld['small']:.0f} windows/s; the {args.preset} "
          f"flow trainer consumes {consumed:.0f}: {ld['small'] / consumed:.1f}x (target >= 3x)")  # fmt: skip
    for name, side in (("small", args.size), ("full", 128)):
        print(f"loader, 1 worker, {side} px: {ld[name] * K:.0f} frames/s; read+decode bound "
              f"(1 process) {bd[name]:.0f}: {ld[name] * K / bd[name]:.2f}x (target >= 0.8x)")  # fmt: skip
    print(f"loader, 2 workers, 128 px: {ld['full2'] * K:.0f} frames/s: "
          f"{ld['full2'] * K / bd['full']:.2f}x the 1-process bound")  # fmt: skip
    print(json.dumps({"images_per_s": med, "loader_windows_per_s": ld, "bound_frames_per_s": bd}))


if __name__ == "__main__":
    main()
