"""Generation check: does the short-run recipe draw data-like samples on this machine?

Builds the demo's synthetic HanCo-format set with `pipeline build`, trains the `cpu-short`
recipe (`python -m train --recipe cpu-short`) for each method asked, samples the final EMA
weights as `make demo` does (DDIM 100 steps, eta 1, x0 clipped) and prints `python -m eval generation`'s table:
against the build's train frames, the offline Frechet distance, precision and recall of (a) the
samples, (b) Gaussian-noise images, (c) real held-out frames of the same size and count, with
the share of near-black (background) pixels and the mean nearest-neighbour L2 distance to the
training frames. Then the three criteria of a data-like run, each PASS or FAIL:

* the samples close at least 60% of the Frechet gap from noise to real held-out frames;
* their precision is at least 0.1;
* their near-black pixels are at least half as frequent as in the real frames.

Run: .venv/bin/python bench/generation.py [--methods iid,flow --n 128 --steps 100 --work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GAP, PRECISION, BACKGROUND = 0.6, 0.1, 0.5
BUILD = ["--src", "synthetic", "--synth-sequences", "16", "--val-fraction", "0.25"]


def run(cmd: list[str]) -> float:
    """Run a command (its output to this stderr); its wall-clock seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return time.perf_counter() - t0


def verdicts(result: dict, name: str) -> list[tuple[str, bool]]:
    s, real = result["sets"][name], result["sets"]["real held-out"]
    return [
        (f"gap closed {s['gap_closed']:.0%} >= {GAP:.0%}", (s["gap_closed"] or 0) >= GAP),
        (f"precision {s['precision']:.2f} >= {PRECISION}", (s["precision"] or 0) >= PRECISION),
        (
            f"near-black {s['near_black']:.0%} >= {BACKGROUND:.0%} of real {real['near_black']:.0%}",
            s["near_black"] >= BACKGROUND * real["near_black"],
        ),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="iid,flow")
    p.add_argument("--recipe", default="cpu-short")
    p.add_argument("--n", type=int, default=128, help="samples per run")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--work", help="keep the build and runs here (default: a temporary folder)")
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        build = work / "shards"
        if not (build / "dataset.json").exists():
            run([py, "-m", "pipeline", "build", *BUILD, "--out", str(build)])
        walls, folders = {}, {}
        for method in args.methods.split(","):
            out, samples = work / "runs" / method, work / "samples" / method
            walls[method] = run([py, "-m", "train", "--recipe", args.recipe, "--method", method,
                                 "--shards", str(build), "--out", str(out), "--val-every", "0",
                                 "--diag-every", "0", "--no-progress"])  # fmt: skip
            run([py, "-m", "eval", "sample", "--run", str(out), "--n", str(args.n), "--steps",
                 str(args.steps), "--eta", str(args.eta), "--out", str(samples),
                 "--no-progress"])  # fmt: skip
            folders[method] = samples
        result_file = work / "generation.json"
        names = [f"{m}={f}" for m, f in folders.items()]
        subprocess.run([py, "-m", "eval", "generation", *names, "--shards", str(build), "--out",
                        str(result_file), "--grid", str(work / "grid.png")], check=True)  # fmt: skip
        result = json.loads(result_file.read_text())
    print()
    print(f"recipe {args.recipe}: {args.n} samples per run, DDIM {args.steps} steps, eta "
          f"{args.eta}, x0 clipped")  # fmt: skip
    failed = 0
    for method in folders:
        checks = verdicts(result, method)
        failed += sum(not ok for _, ok in checks)
        said = "; ".join(f"{'PASS' if ok else 'FAIL'} {text}" for text, ok in checks)
        print(f"{method}: trained in {walls[method]:.0f} s; {said}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
