"""HanCo discovery at scale: time and memory of listing a HanCo-layout tree (no pixels decoded).

Fabricates ``--sequences`` x 8 cameras x 70 frames of 224 px JPEGs (hard links to one file per
sequence, so the tree costs almost no disk) plus ``mask_fg`` and a real-format ``meta.json``,
then times ``discover_handco`` (directory listing, numbering, stat of every image and mask for
the fingerprints, one image header per track for the flow size) three times, each in a fresh
process. The tree was just written, so the page cache is warm; a cold network file system is
slower. HanCo itself is 1518 sequences: multiply by 1518 / sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CAMERAS, FRAMES = 8, 70

_MEASURE = """
import resource, sys, time
from pipeline.handco import discover_handco
t = time.perf_counter()
d = discover_handco(sys.argv[1])
dt = time.perf_counter() - t
frames = sum(len(t.ids) for t in d.tracks)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{len(d.tracks)} {frames} {dt:.2f} {rss:.0f}")
"""


def fabricate(root: Path, sequences: int) -> None:
    one = root / "one.jpg"
    cv2.imwrite(str(one), np.full((224, 224, 3), 100, np.uint8))
    for s in range(sequences):
        base = root / f"base{s}.jpg"  # one inode per sequence: below the file system's link limit
        shutil.copy(one, base)
        for kind in ("rgb", "mask_fg"):
            for c in range(CAMERAS):
                d = root / kind / f"{s:04d}" / f"cam{c}"
                d.mkdir(parents=True)
                for f in range(FRAMES):
                    os.link(base, d / f"{f:08d}.jpg")
    meta = {
        k: [[v] * FRAMES for _ in range(sequences)]
        for k, v in (
            ("is_train", True),
            ("subject_id", 1),
            ("is_valid", True),
            ("object_id", None),
            ("has_fit", True),
        )  # fmt: skip
    }
    (root / "meta.json").write_text(json.dumps(meta))


def measure(root: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(root)], cwd=REPO, check=True,
                       capture_output=True, text=True)  # fmt: skip
    return r.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        fabricate(root, args.sequences)
        runs = [measure(root) for _ in range(3)]
    tracks, frames = runs[0][0], runs[0][1]
    print(f"discover_handco: {tracks} tracks, {frames} frames (+ as many masks)")
    for i, (_, _, secs, rss) in enumerate(runs):
        print(f"  run {i + 1}: {secs} s, peak RSS {rss} MiB")
    scale = 1518 / args.sequences
    best = min(float(r[2]) for r in runs)
    print(f"  at HanCo's 1518 sequences (x{scale:.2f}, linear): about {best * scale:.0f} s")


if __name__ == "__main__":
    main()
