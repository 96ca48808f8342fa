"""Training images/s of this checkout against another revision, side by side in one run.

Both trees train the same method on the same synthetic build (made once, by this checkout's
`pipeline build`) with the same options, in alternating rounds (this VM's speed drifts): the
other revision is unpacked with ``git archive`` into a temporary folder and its ``python -m
train`` runs from there, so each round times exactly the code of its tree. The figure is the
median images/s over each run's steps after the first quarter, then the median over rounds.

Run: .venv/bin/python bench/train_revisions.py --rev 7b34926 [--method flow --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import make_build  # noqa: E402
from train.metrics import read_metrics, steps  # noqa: E402


def unpack(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (git archive) in ``into``."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def rate(tree: Path, build: Path, out: Path, args) -> float:
    cmd = [sys.executable, "-m", "train", "--shards", str(build), "--out", str(out),
           "--method", args.method, "--preset", "tiny", "--batch", str(args.batch),
           "--image-size", str(args.size), "--max-steps", str(args.steps), "--val-every", "0",
           "--diag-every", "0", "--ckpt-every", str(10**9), "--no-progress",
           "--workers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    rates = [r["images_per_s"] for r in steps(read_metrics(out))]
    return statistics.median(rates[len(rates) // 4 :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="the revision to compare with (e.g. a commit)")
    p.add_argument("--method", default="flow")
    p.add_argument("--batch", type=int, default=16, help="windows (or frames for iid) per step")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build = make_build(work / "build", args.size)
        trees = {"this checkout": ROOT, args.rev: unpack(args.rev, work / "other")}
        got: dict[str, list[float]] = {name: [] for name in trees}
        for i in range(args.rounds):
            for name, tree in trees.items():
                got[name].append(
                    rate(tree, build, work / f"run-{i}-{len(got[name])}-{id(tree)}", args)
                )
    base = statistics.median(got[args.rev])
    print(f"{args.method}, tiny at {args.size} px, batch {args.batch}, {args.steps} steps, "
          f"medians of {args.rounds} alternating rounds")  # fmt: skip
    for name, values in got.items():
        med = statistics.median(values)
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name:<16}{med:>9.1f} images/s  {med / base:.3f}x   ({runs})")


if __name__ == "__main__":
    main()
