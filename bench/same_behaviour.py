"""Does this checkout behave exactly as another revision? Shards, losses and samples, byte for byte.

A change meant to leave behaviour alone (a refactor) is checked with it: the other revision is
unpacked with ``git archive`` into a temporary folder, and each tree in turn

1. builds the same inputs with the same seed (the synthetic set with flow and masks kept, and
   ``../shared/data`` as a video source when it is there); every file of the two builds must be
   identical, ``summary.json`` compared without its timings;
2. trains, on the reference build, each method of ``--methods`` and the ``cpu-short`` recipe for
   a few steps with validation, diagnostics, gradient accumulation and checkpoints on; every
   record of ``metrics.jsonl`` but the timings must be equal, and so must the final weights;
3. samples a run with DDIM; the PNG files must be identical.

It prints one line per comparison and exits 1 when any differs.

Run: .venv/bin/python bench/same_behaviour.py --rev a252bba [--builds-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_revisions import unpack  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# what differs between two runs of the very same code: clocks, paths and run identities
TIMING = {"images_per_s", "windows_per_s", "data_wait", "wall_s", "run_id", "elapsed_s"}
# summary.json is the build's timings; dataset.json (the manifest) holds none of these
BUILD_VOLATILE = {"wall_s", "out", "frames_per_s", "stage_s"}
JSON_FILES = ("dataset.json", "summary.json")


def _run(tree: Path, args: list[str], cwd: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd or tree, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{tree}: {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def builds(tree: Path, out: Path) -> dict[str, Path]:
    """The builds of one tree, by name."""
    made = {}
    synth = out / "synthetic"
    _run(tree, ["-m", "pipeline", "build", "--src", "synthetic", "--out", str(synth),
                "--size", "32", "--synth-sequences", "8", "--synth-frames", "24",
                "--val-fraction", "0.25", "--keep-flow", "8", "--keep-mask", "--shard-size",
                "16", "--seed", "3", "--workers", "2", "--no-progress"])  # fmt: skip
    made["synthetic"] = synth
    if SHARED.is_dir():
        video = out / "video"
        _run(tree, ["-m", "pipeline", "build", "--src", "video", "--root", str(SHARED),
                    "--out", str(video), "--size", "32", "--frame-stride", "3",
                    "--shard-size", "32", "--seed", "5", "--workers", "2",
                    "--no-progress"])  # fmt: skip
        made["video"] = video
    return made


def _strip(obj, volatile: set[str]):
    if isinstance(obj, dict):
        return {k: _strip(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_strip(v, volatile) for v in obj]
    return obj


def _files(folder: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(folder)): p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def same_build(a: Path, b: Path) -> list[str]:
    """What differs between two builds (empty when they are the same)."""
    fa, fb = _files(a), _files(b)
    diffs = [f"only in one build: {n}" for n in sorted(set(fa) ^ set(fb))]
    for name in sorted(set(fa) & set(fb)):
        if name in JSON_FILES:
            ma, mb = (_strip(json.loads(f[name].read_text()), BUILD_VOLATILE) for f in (fa, fb))
            if ma != mb:
                keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
                diffs.append(f"{name} differs in {', '.join(keys)}")
        elif fa[name].read_bytes() != fb[name].read_bytes():
            diffs.append(f"{name} differs")
    return diffs


RUNS = {  # name: extra train arguments
    "iid": ["--method", "iid", "--grad-accum", "2"],
    "flow": ["--method", "flow"],
    "divergence": ["--method", "divergence"],
    "dispersive": ["--method", "dispersive"],
    "cpu-short": ["--method", "flow", "--recipe", "cpu-short", "--batch", "8"],
}


def train(tree: Path, build: Path, out: Path, extra: list[str]) -> None:
    _run(tree, ["-m", "train", "--shards", str(build), "--out", str(out), "--preset", "tiny",
                "--image-size", "32", "--batch", "6", "--max-steps", "24", "--val-every", "8",
                "--diag-every", "12", "--ckpt-every", "12", "--no-progress", "--workers", "1",
                "--seed", "11", *extra])  # fmt: skip


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [_strip(json.loads(line), TIMING) for line in lines if line.strip()]


def same_run(a: Path, b: Path) -> list[str]:
    ra, rb = _records(a), _records(b)
    diffs = []
    if len(ra) != len(rb):
        diffs.append(f"{len(ra)} records against {len(rb)}")
    for i, (x, y) in enumerate(zip(ra, rb, strict=False)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            diffs.append(f"record {i} ({x.get('kind', 'step')}, step {x.get('step')}) differs "
                         f"in {', '.join(keys)}")  # fmt: skip
            break
    ca, cb = (sorted(r.glob("ckpt-*.pt"))[-1] for r in (a, b))
    sa, sb = (torch.load(c, map_location="cpu", weights_only=True) for c in (ca, cb))
    for part in ("model", "ema"):
        for name, tensor in sa[part].items():
            if not torch.equal(tensor, sb[part][name]):
                diffs.append(f"final {part} weights differ ({name})")
                break
    return diffs


def same_samples(a: Path, b: Path) -> list[str]:
    fa, fb = ({p.name: p.read_bytes() for p in f.glob("*.png")} for f in (a, b))
    if not fa:
        return ["no samples written"]
    return [] if fa == fb else [f"{sum(fa[n] != fb.get(n) for n in fa)} of {len(fa)} PNGs differ"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="the revision to compare with (e.g. a commit)")
    p.add_argument("--builds-only", action="store_true",
                   help="compare the builds only (no training, no sampling)")  # fmt: skip
    args = p.parse_args()
    failed = False

    def report(what: str, diffs: list[str]) -> None:
        nonlocal failed
        failed |= bool(diffs)
        print(f"{what:<40}{'identical' if not diffs else 'DIFFERS: ' + '; '.join(diffs)}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"this": ROOT, "other": unpack(args.rev, work / "tree")}
        made = {name: builds(tree, work / f"builds-{name}") for name, tree in trees.items()}
        for name in made["other"]:
            report(f"build {name}", same_build(made["this"][name], made["other"][name]))
        if args.builds_only:
            print(f"this checkout's builds against {args.rev}: "
                  f"{'DIFFER' if failed else 'identical'}")  # fmt: skip
            sys.exit(1 if failed else 0)
        build = made["other"]["synthetic"]
        for run, extra in RUNS.items():
            for name, tree in trees.items():
                train(tree, build, work / f"run-{name}-{run}", extra)
            report(f"train {run}", same_run(work / f"run-this-{run}", work / f"run-other-{run}"))
        for name, tree in trees.items():
            _run(tree, ["-m", "eval", "sample", "--run", str(work / "run-other-cpu-short"),
                        "--out", str(work / f"samples-{name}"), "--n", "8", "--steps", "6",
                        "--eta", "1", "--device", "cpu", "--no-progress"])  # fmt: skip
        report("eval sample", same_samples(work / "samples-this", work / "samples-other"))
    print(f"this checkout against {args.rev}: {'DIFFERS' if failed else 'the same behaviour'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
